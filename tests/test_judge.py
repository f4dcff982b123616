"""The judge without models: prompt templates, strict verdict parsing against hand-written judge outputs, and
the OpenAI-compatible client (retries, rate limit, parse retries, resume) against a real HTTP server on loopback
whose replies the test scripts."""

import asyncio
import json
import logging
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.config.eval import EvalSection
from tgdpo_ray.eval.flow import judge_all, judgment_tasks
from tgdpo_ray.eval.judge import (JudgeError, OpenAIJudge, RuleJudge, check_references, load_prompts, parse_choice,
                                  parse_rating, render)
from tgdpo_ray.eval.questions import Question

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


@pytest.mark.parametrize("prompt_set", ["tgdpo-ray", "fastchat"])
def test_both_prompt_sets_cover_every_mode_turn_and_reference(prompt_set):
    prompts = load_prompts(prompt_set)
    for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn",
                 "pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn"):
        assert name in prompts
        assert prompts[name]["output_format"] in ("[[rating]]", "[[A]]")


def test_fastchat_prompts_are_fastchats_own_text():
    fastchat, ours = load_prompts("fastchat"), load_prompts("tgdpo-ray")
    # FastChat's single-answer prompt, word for word; ours is written for this project and differs.
    assert fastchat["single-v1"]["system_prompt"] == "You are a helpful assistant."
    assert fastchat["single-v1"]["prompt_template"].startswith(
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by "
        "an AI assistant to the user question displayed below.")
    assert ours["single-v1"]["prompt_template"] != fastchat["single-v1"]["prompt_template"]


def test_a_reference_guided_question_without_a_reference_is_an_error_not_a_plain_prompt():
    no_reference = Question("123", "coding", ("Write a function.", "Now test it."), None)
    one_turn_only = Question("7", "math", ("What is 2 + 3?", "And times 4?"), ("5",))
    check_references([MATH, WRITING])  # a writing question needs none
    with pytest.raises(JudgeError, match=r"2 question\(s\).*123 \(coding\), 7 \(math\).*eval.questions.references"):
        check_references([no_reference, WRITING, one_turn_only])


def test_turn_two_is_judged_with_the_whole_conversation_and_the_references():
    prompts = load_prompts("tgdpo-ray")
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
    replies to give, in order (the last one repeats): an int is an HTTP error status, a string the completion's
    content, a dict any of {"status", "headers", "body" (raw text), "content_type", "delay" (seconds before
    answering), "reply" (the content)}."""

    def __init__(self, script: dict[str, list]):
        self.script, self.requests, self.headers, self.lock = script, [], [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = json.dumps(body["messages"])
                with endpoint.lock:
                    endpoint.requests.append((time.monotonic(), body, self.headers.get("Authorization")))
                    endpoint.headers.append(dict(self.headers))
                    marker = next(m for m in endpoint.script if m in text)
                    reply = endpoint.script[marker].pop(0) if len(endpoint.script[marker]) > 1 \
                        else endpoint.script[marker][0]
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    self.answer(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

            def answer(self, reply):
                if not isinstance(reply, dict):
                    reply = {"status": reply} if isinstance(reply, int) else {"reply": reply}
                time.sleep(reply.get("delay", 0))
                status = reply.get("status", 200)
                if "body" in reply:
                    payload = reply["body"].encode()
                elif status != 200:
                    payload = b'{"error": "scripted"}'
                else:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": reply["reply"]}}]}).encode()
                self.send_response(status)
                if reply.get("content_type", "application/json" if status == 200 else None):
                    self.send_header("Content-Type", reply.get("content_type", "application/json"))
                for name, value in reply.get("headers", {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self, marker: str) -> list[float]:
        """When the requests carrying `marker` arrived."""
        return [at for at, body, _ in self.requests if marker in json.dumps(body["messages"])]


def client(url: str, **overrides) -> OpenAIJudge:
    settings = dict(base_url=url, model="judge", api_key_env=None, max_tokens=64, retries=3, timeout_s=10,
                    requests_per_second=1000, concurrency=4)
    return OpenAIJudge(**{**settings, **overrides})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def no_backoff(monkeypatch):
    """Retries at once (the rate limit and a server's Retry-After still apply), to keep tests short."""
    monkeypatch.setattr(OpenAIJudge, "backoff_s", lambda self, attempt: 0.0)


def test_busy_endpoint_is_retried_and_a_wrong_request_stops_the_job(monkeypatch):
    endpoint = ScriptedEndpoint({"busy": [429, 503, "ok [[4]]"], "down": [500],
                                 "broken": [{"status": 401, "body": '{"error": {"message": "Incorrect API key"}}'}]})
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = client(endpoint.url, api_key_env="JUDGE_KEY", retries=2)
    assert judge.ask(user("busy"), 0.0, 1) == ("ok [[4]]", None)
    assert len(endpoint.requests) == 3 and {auth for _, _, auth in endpoint.requests} == {"Bearer secret"}
    # The body is the chat completion we asked for.
    body = endpoint.requests[0][1]
    assert (body["model"], body["messages"], body["temperature"], body["max_tokens"], body["seed"]) == \
        ("judge", user("busy"), 0.0, 64, 1)
    text, error = judge.ask(user("down"), 0.0, 1)
    assert text == "" and "gave up after 3 attempts" in error and "HTTP 500" in error
    assert len(endpoint.asked("down")) == 3  # retries + 1, no hidden retries inside the client
    with pytest.raises(JudgeError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions answered "
                                         r"HTTP 401: .*Incorrect API key"):
        judge.ask(user("broken"), 0.0, 1)
    assert len(endpoint.asked("broken")) == 1  # not retried
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(JudgeError, match="JUDGE_KEY is not set"):
        client(endpoint.url, api_key_env="JUDGE_KEY")


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_every_busy_or_failed_status_is_retried(status, no_backoff):
    endpoint = ScriptedEndpoint({"flaky": [status, "[[7]]"]})
    assert client(endpoint.url, retries=1).ask(user("flaky"), 0.0, 1) == ("[[7]]", None)
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_other_statuses_stop_the_job_at_once(status, no_backoff):
    endpoint = ScriptedEndpoint({"bad": [{"status": status, "body": f"no such model (status {status})"}]})
    with pytest.raises(JudgeError, match=f"answered HTTP {status}: no such model"):
        client(endpoint.url).ask(user("bad"), 0.0, 1)
    assert len(endpoint.requests) == 1


def test_a_wrong_request_in_a_batch_stops_the_whole_batch_and_the_judge_still_works_after(no_backoff):
    endpoint = ScriptedEndpoint({"slow": [{"delay": 0.3, "reply": "[[5]]"}], "broken": [401], "fine": ["[[6]]"]})
    judge = client(endpoint.url, concurrency=8)
    with pytest.raises(JudgeError, match="HTTP 401"):  # a JudgeError, not an ExceptionGroup or a list of errors
        judge.complete([(user("slow"), 0.0, seed) for seed in range(4)] + [(user("broken"), 0.0, 9)])
    assert judge.complete([(user("fine"), 0.0, 1), (user("fine"), 0.0, 2)]) == [("[[6]]", None)] * 2


def test_without_a_key_only_a_placeholder_is_sent(monkeypatch):
    # The client would otherwise send these ambient credentials to whatever endpoint the judge names.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-custom")
    endpoint = ScriptedEndpoint({"go": ["[[5]]"]})
    assert client(endpoint.url).ask(user("go"), 0.0, 1) == ("[[5]]", None)
    assert [auth for _, _, auth in endpoint.requests] == ["Bearer EMPTY"]
    monkeypatch.setenv("JUDGE_KEY", "secret")
    client(endpoint.url, api_key_env="JUDGE_KEY").ask(user("go"), 0.0, 1)
    assert endpoint.requests[-1][2] == "Bearer secret"


def test_timeouts_and_connection_errors_are_retried_then_recorded(no_backoff):
    endpoint = ScriptedEndpoint({"slow-once": [{"delay": 2.5, "reply": "late"}, "[[6]]"],
                                 "always-slow": [{"delay": 2.5, "reply": "late"}]})
    judge = client(endpoint.url, timeout_s=1, retries=1)
    assert judge.ask(user("slow-once"), 0.0, 1) == ("[[6]]", None)
    assert len(endpoint.asked("slow-once")) == 2
    text, error = judge.ask(user("always-slow"), 0.0, 1)
    assert text == "" and "gave up after 2 attempts (APITimeoutError" in error
    assert len(endpoint.asked("always-slow")) == 2

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    text, error = client(f"http://127.0.0.1:{port}/v1", retries=2).ask(user("go"), 0.0, 1)
    assert text == "" and "gave up after 3 attempts (APIConnectionError" in error


def test_a_reply_that_is_not_a_chat_completion_is_recorded_not_a_crash():
    endpoint = ScriptedEndpoint({"plain": [{"body": "hello", "content_type": "text/plain"}],
                                 "other": [{"body": '{"result": 1}'}], "broken-json": [{"body": "{not json"}]})
    replies = client(endpoint.url).complete([(user(m), 0.0, 1) for m in ("plain", "other", "broken-json")])
    assert replies == [("", "not a chat completion: hello"), ("", 'not a chat completion: {"result": 1}'),
                       ("", "not a chat completion: {not json")]


def test_the_rate_limit_spaces_request_starts():
    endpoint = ScriptedEndpoint({"go": ["[[5]]"]})
    judge = client(endpoint.url, requests_per_second=20, concurrency=8)
    judge.complete([([{"role": "user", "content": "go"}], 0.0, seed) for seed in range(9)])
    starts = sorted(at for at, _, _ in endpoint.requests)
    assert len(starts) == 9 and starts[-1] - starts[0] >= 8 / 20 - 0.02
    # No bursts either: any five consecutive starts span four intervals (less the server's scheduling jitter).
    assert min(b - a for a, b in zip(starts, starts[4:])) >= 4 / 20 - 0.05


def test_the_rate_limit_spaces_retries_too_and_holds_across_calls(no_backoff):
    endpoint = ScriptedEndpoint({"busy": [429, 429, 429, "[[3]]"], "go": ["[[5]]"]})
    judge = client(endpoint.url, requests_per_second=10, retries=3)
    assert judge.ask(user("busy"), 0.0, 1) == ("[[3]]", None)
    judge.ask(user("go"), 0.0, 1)  # a new call (and a new event loop) still waits for the last start's slot
    starts = [at for at, _, _ in endpoint.requests]
    assert len(starts) == 5 and min(b - a for a, b in zip(starts, starts[1:])) >= 0.1 - 0.04


def test_a_servers_retry_after_is_waited(no_backoff):
    endpoint = ScriptedEndpoint({"later": [{"status": 429, "headers": {"Retry-After": "1"}}, "[[2]]"]})
    assert client(endpoint.url).ask(user("later"), 0.0, 1) == ("[[2]]", None)
    first, second = endpoint.asked("later")
    assert second - first >= 1 - 0.1


def test_concurrency_limits_the_requests_in_flight():
    endpoint = ScriptedEndpoint({"go": [{"delay": 0.2, "reply": "[[5]]"}]})
    replies = client(endpoint.url, concurrency=2).complete([(user("go"), 0.0, seed) for seed in range(6)])
    assert replies == [("[[5]]", None)] * 6 and endpoint.max_in_flight == 2


def test_complete_works_again_and_again_from_threads_and_inside_an_event_loop():
    endpoint = ScriptedEndpoint({"go": ["[[5]]"]})
    judge = client(endpoint.url)
    requests = [(user("go"), 0.0, seed) for seed in range(3)]
    for _ in range(3):
        assert judge.complete(requests) == [("[[5]]", None)] * 3
    results = []
    threads = [threading.Thread(target=lambda: results.append(judge.complete(requests))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[("[[5]]", None)] * 3] * 3

    async def from_a_coroutine():
        return judge.complete(requests)

    assert asyncio.run(from_a_coroutine()) == [("[[5]]", None)] * 3
    assert judge.complete([]) == []


def test_the_client_does_not_log_every_request(caplog, no_backoff):
    endpoint = ScriptedEndpoint({"go": [503, "[[5]]"]})
    caplog.set_level(logging.DEBUG)  # as an application that turns logging up would
    judge = client(endpoint.url)
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judge.ask(user("go"), 0.0, 1) == ("[[5]]", None)
    assert [r.name for r in caplog.records if r.name.startswith(("openai", "httpx", "httpcore"))] == []


def answers_for(models: dict[str, list[str]], question: Question) -> list[dict]:
    return [{"model": name, "question_id": question.question_id, "category": question.category, "turns": turns,
             "tokens": [len(t.split()) for t in turns], "errors": [None] * len(turns)}
            for name, turns in models.items()]


def test_pairwise_judging_in_both_orders_with_parse_retries_and_resume(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"backend": "openai", "base_url": "http://unused", "model": "j",
                                                       "mode": "pairwise", "parse_retries": 1}})
    answers = answers_for({"new": ["NEW-1", "NEW-2"], "old": ["OLD-1", "OLD-2"]}, WRITING)
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["new", "old"], load_prompts("tgdpo-ray"))
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
    assert len(read_records(path)) == 4

    # A re-run finds every judgment on disk: the judge is not even started.
    again = judge_all(lambda: started.append(1) or client(endpoint.url), evaluation, tasks, path, log=print)
    assert again == judgments and started == [1] and len(endpoint.requests) == 6


def test_an_answer_that_could_not_be_generated_is_recorded_not_judged(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"model": "j"}})
    answers = answers_for({"m": ["fine", ""]}, WRITING)
    answers[0]["errors"][1] = "the prompt has 600 tokens; max_model_len is 512"
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["m"], load_prompts("tgdpo-ray"))
    endpoint = ScriptedEndpoint({"fine": ["[[8]]"]})
    judgments = judge_all(lambda: client(endpoint.url), evaluation, tasks, tmp_path / "j.jsonl", log=print)
    assert [j["score"] for j in judgments] == [8.0, None]
    assert judgments[1]["error"].startswith("answer missing: the prompt has 600 tokens")
    assert len(endpoint.requests) == 1


def test_identical_answers_still_get_a_judgment_per_model_and_order(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"model": "j", "mode": "pairwise", "baseline": "old"}})
    answers = answers_for({"new": ["SAME", "SAME"], "old": ["SAME", "SAME"], "mid": ["SAME", "SAME"]}, WRITING)
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["new", "old", "mid"], load_prompts("tgdpo-ray"))
    assert len({task["digest"] for task in tasks}) == len(tasks) == 8  # 2 comparisons x 2 turns x 2 orders
    endpoint = ScriptedEndpoint({"SAME": ["[[C]]"]})
    judgments = judge_all(lambda: client(endpoint.url), evaluation, tasks, tmp_path / "j.jsonl", log=print)
    assert sorted((j["model_a"], j["order"]) for j in judgments) == sorted(
        (model, order) for model in ("new", "mid") for order in ("ab", "ba") for _ in (1, 2))


# ---------------------------------------------------------------- the rule judge


def length_rule(question: str, answer: str, reference) -> float:
    """A rule for the tests: 1 for the reference itself, else the share of the question's words echoed."""
    if reference is not None and answer == reference:
        return 1.0
    words = question.split()
    return sum(word in answer.split() for word in words) / len(words)


def test_a_rule_judge_scores_every_answer_and_picks_the_better_one_in_both_orders(tmp_path):
    repeat = Question("1", "demo", ("Repeat: apple river stone",), ("apple river stone",))
    answers = answers_for({"good": ["apple river stone"], "half": ["apple stone"]}, repeat)
    function = f"{__name__}:length_rule"
    single = EvalSection.model_validate({"judge": {"backend": "rule", "function": function}})
    judgments = judge_all(lambda: RuleJudge(function), single,
                          judgment_tasks(single, [repeat], answers, ["good", "half"], None), tmp_path / "s.jsonl")
    assert [(j["model"], j["score"], j["error"]) for j in judgments] == [("good", 1.0, None), ("half", 0.5, None)]
    assert judgments[0]["judge"] == f"rule:{function}" and judgments[0]["prompt"] == "rule"

    pairwise = EvalSection.model_validate({"judge": {"backend": "rule", "function": function, "mode": "pairwise"}})
    tasks = judgment_tasks(pairwise, [repeat], answers, ["half", "good"], None)
    judgments = judge_all(lambda: RuleJudge(function), pairwise, tasks, tmp_path / "p.jsonl")
    # The better answer wins whichever order it is shown in.
    assert [(j["order"], j["verdict"], j["winner"]) for j in judgments] == [("ab", "B", "good"), ("ba", "A", "good")]


def test_a_rule_that_cannot_be_imported_or_breaks_stops_the_job_naming_it(tmp_path):
    with pytest.raises(JudgeError, match="judge.function no_such_module:f: cannot import it"):
        RuleJudge("no_such_module:f")
    with pytest.raises(JudgeError, match="judge.function tgdpo_ray.experiments.demo:nothing: cannot import it"):
        RuleJudge("tgdpo_ray.experiments.demo:nothing")
    question = Question("9", "demo", ("Repeat: apple",), None)
    task = judgment_tasks(EvalSection.model_validate({"judge": {"backend": "rule", "function": "m:f"}}),
                          [question], answers_for({"m": ["apple"]}, question), ["m"], None)[0]
    with pytest.raises(JudgeError, match=r"raised ZeroDivisionError.*question 9, turn 1"):
        RuleJudge(f"{__name__}:broken_rule").scores(task)
    with pytest.raises(JudgeError, match=r"returned 'high' for question 9, turn 1: expected a number"):
        RuleJudge(f"{__name__}:word_rule").scores(task)


def broken_rule(question, answer, reference):
    return 1 / 0


def word_rule(question, answer, reference):
    return "high"
