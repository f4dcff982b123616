"""Real vLLM engines (the CPU build) in Ray actors, as the evaluation starts them.

The demo's own engine settings start on any machine (the KV cache is a size, not a share of host memory), an engine
killed mid-job is started again and its batch sent again, an engine that cannot fit fails with one line, seeded sampling survives prompts longer than vLLM's batched-token limit, and
FastChat's real MT-Bench runs end to end with FastChat's judge prompts, on tiny models.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import kill_engines

from tgdpo_ray.config.eval import GenerationSection
from tgdpo_ray.config.loader import build_config, read_raw_config
from tgdpo_ray.eval.flow import run_eval
from tgdpo_ray.eval.generation import Engine, GenerationError, actor_options, engine_args
from tgdpo_ray.experiments.demo import rule_score

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def long_model(tiny_model, tmp_path_factory):
    """The tiny model with room for 8192 positions (rotary embeddings work at any length)."""
    folder = tmp_path_factory.mktemp("long-model") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return str(folder)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cpu_engines_compute_with_the_threads_of_the_cpus_they_hold():
    cpu = actor_options(GenerationSection(on_gpus=False, cpus_per_engine=3))
    # Ray would set OMP_NUM_THREADS=1 for a 1-CPU actor, and vLLM would pin every engine to the same cores.
    assert cpu["num_cpus"] == 3 and cpu["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "3",
                                                                       "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                                                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    gpu = actor_options(GenerationSection(tensor_parallel_size=2))
    assert gpu["num_gpus"] == 2 and gpu["runtime_env"]["env_vars"] == {}
    args = engine_args("m", GenerationSection(on_gpus=False), seed=1, trust_remote_code=False)
    assert args["kv_cache_memory_bytes"] == 256 * 2**20 and args["enable_chunked_prefill"] is False
    assert "gpu_memory_utilization" not in args
    args = engine_args("m", GenerationSection(), seed=1, trust_remote_code=False)
    assert args["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in args


def test_the_demo_evaluation_runs_with_the_demos_own_engine_settings(ray_cluster, tiny_model, demo_data, tmp_path):
    """jobs/demo.yaml's eval section as it is (its questions written by the demo data, its models the tiny one):
    two CPU engines at once with the default KV cache size, answers written batch by batch, graded by the rule.
    Both engines are killed once tgdpo's first batch is on disk: tgdpo's engine between its batches, dpo's most
    likely in the middle of one; each lost engine is started again, its batch sent again, and every question is
    answered once, as an engine never killed answers it (both models are the same model, with the same seeds)."""
    section = read_raw_config(ROOT / "jobs" / "demo.yaml")["eval"]
    section["questions"]["path"] = str(demo_data["questions"])
    section["generation"]["questions_per_batch"] = 8
    config = build_config({"kind": "eval", "run": {"name": "demo-eval", "output_dir": str(tmp_path)},
                           "eval": {**section, "models": [{"name": "tgdpo", "path": tiny_model},
                                                          {"name": "dpo", "path": tiny_model}]}})
    answers_path = config.eval_dir / "answers.jsonl"
    lines, on_disk, killed = [], [], []

    def log(line: str) -> None:
        lines.append(line)
        if ": answered" in line:  # how many answers were on disk when progress was reported
            on_disk.append(len(answers_path.read_text().splitlines()))
        if "tgdpo: answered 8/32" in line:
            killed.append(kill_engines())

    summary = run_eval(config, log=log)
    questions = jsonl(demo_data["questions"])
    progress = [line for line in lines if "tgdpo: answered" in line]
    assert [line.split("answered ")[1].split(" turns")[0] for line in progress] == ["8/32", "16/32", "24/32", "32/32"]
    assert all("tokens/s" in line and "s left" in line for line in progress)
    # Each batch was on disk when its progress line came, before the next batch was asked.
    assert on_disk == sorted(on_disk) and on_disk[0] >= 8 and on_disk[-1] == 64 and len(on_disk) == 8
    assert any("judged 32/64 judgments" in line for line in lines)

    by_id = {str(q["question_id"]): q for q in questions}
    judgments = jsonl(config.eval_dir / "judgments.jsonl")
    answers = {(a["model"], a["question_id"]): a for a in jsonl(answers_path)}
    assert len(judgments) == 64 and summary["unparseable_judgments"] == 0
    for judgment in judgments:  # every score is the rule's score of that very answer
        answer = answers[(judgment["model"], judgment["question_id"])]["turns"][0]
        assert judgment["score"] == rule_score(by_id[judgment["question_id"]]["turns"][0], answer)
    scores = summary["scores"]["models"]
    assert set(scores) == {"tgdpo", "dpo"} and all(model["n_scored"] == 32 for model in scores.values())
    assert summary["judge"] == "rule:tgdpo_ray.experiments.demo:rule_score"

    restarts = [line for line in lines if "was lost (" in line]
    assert killed[0] >= 1 and 1 <= len(restarts) <= killed[0], lines
    assert all(line.endswith("starting it again (restart 1 of 3)") for line in restarts)
    assert any("with 8 conversation(s) to answer, which go to the new one" in line for line in restarts)
    assert len(answers) == len(jsonl(answers_path)) == 64  # one record per model and question
    assert all(answers[("tgdpo", key)]["turns"] == answers[("dpo", key)]["turns"]
               for key in by_id)


def test_an_engine_lost_more_often_than_max_restarts_ends_the_job_with_one_line(ray_cluster, tiny_model):
    import ray

    section = GenerationSection(on_gpus=False, max_model_len=512, enforce_eager=True, max_restarts=0)
    engine = Engine(tiny_model, section, seed=0, key="eval.generation")
    ray.kill(engine.actor)  # lost before it had loaded its model
    with pytest.raises(GenerationError, match=r"^vLLM engine for .* was lost \(\w+\) while it loaded its model, "
                                              r"after 0 restart\(s\): eval.generation.max_restarts is 0$"):
        engine.wait_started()


def test_an_engine_that_cannot_fit_fails_with_one_line_naming_model_memory_and_key(ray_cluster, tiny_model):
    section = GenerationSection(on_gpus=False, max_model_len=512, enforce_eager=True, kv_cache_memory_bytes="64TiB")
    engine = Engine(tiny_model, section, seed=0, key="eval.generation")
    try:
        with pytest.raises(GenerationError) as raised:
            engine.wait_started()
    finally:
        engine.release()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"vLLM engine for {tiny_model} could not start")
    assert "Available memory on node" in message  # vLLM's own reason, from its engine process's log
    assert "67108864 MiB KV cache" in message and "eval.generation.kv_cache_memory_bytes" in message


def test_seeded_sampling_survives_prompts_longer_than_the_batched_token_limit(ray_cluster, long_model, tokenizer):
    """vLLM's CPU build crashed ("CPU Generator does not use offset") when a seeded request's prompt was prefilled
    in chunks, i.e. was longer than its batched-token limit (4096 on CPU)."""
    section = GenerationSection(on_gpus=False, max_model_len=8192, enforce_eager=True)
    engine = Engine(long_model, section, seed=0, key="eval.generation")
    try:
        engine.wait_started()
        conversation = [{"role": "user", "content": "apple river stone cloud " * 1200}]
        length = len(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
        assert 4096 < length < 8000
        replies = engine.chat([conversation] * 3, [{"temperature": 1.0, "max_tokens": 8, "seed": seed}
                                                   for seed in range(3)])
    finally:
        engine.release()
    assert [reply["error"] for reply in replies] == [None] * 3
    assert all(reply["prompt_tokens"] == length and reply["tokens"] > 0 for reply in replies)


def test_the_real_mt_bench_with_fastchats_prompts_and_references_on_tiny_models(ray_cluster, long_model, tmp_path):
    """FastChat's 80 questions answered in a vLLM actor and judged by an in-cluster vLLM judge with FastChat's
    prompts; the answers re-graded by another judge; a re-run that recomputes nothing."""
    engine = {"on_gpus": False, "max_model_len": 8192, "enforce_eager": True}
    raw = {"kind": "eval", "run": {"name": "mt-bench", "output_dir": str(tmp_path)}, "eval": {
        "questions": {"path": "mt_bench"}, "models": [{"name": "tiny", "path": long_model}],
        "generation": {**engine, "max_new_tokens": 8},
        "judge": {**engine, "backend": "vllm", "model": long_model, "mode": "single", "max_tokens": 4,
                  "parse_retries": 0}, "bootstrap_samples": 100}}
    config = build_config(raw)
    summary = run_eval(config, log=print)
    assert summary["questions"] == 80 and summary["judge_prompts"] == "fastchat"
    answers = jsonl(config.eval_dir / "answers.jsonl")
    assert len(answers) == 80 and all(len(a["turns"]) == 2 for a in answers)
    judgments = jsonl(config.eval_dir / "judgments.jsonl")
    assert len(judgments) == summary["judgments"] == 160
    prompts = {(j["question_id"], j["turn"]): j["prompt"] for j in judgments}
    # Math, reasoning and coding are judged against GPT-4's references (q123 has none inline), the rest without.
    assert prompts[("123", 1)] == "single-math-v1" and prompts[("123", 2)] == "single-math-v1-multi-turn"
    assert prompts[("81", 1)] == "single-v1" and prompts[("81", 2)] == "single-v1-multi-turn"
    assert sum(name.startswith("single-math") for name in prompts.values()) == 60
    assert "fastchat" in (config.eval_dir / "report.md").read_text()
    assert (config.eval_dir / "scores_by_category.png").read_bytes()[:4] == b"\x89PNG"
    scored = summary["scores"]["models"]["tiny"]
    assert scored["n_scored"] + scored["n_unparseable"] == 160 == summary["judgments"]

    # The same answers graded by another judge in a new folder (README: copy answers.jsonl): no engine starts.
    regrade = build_config({**raw, "run": {"name": "regrade", "output_dir": str(tmp_path)}, "eval": {
        **raw["eval"], "judge": {"backend": "rule", "function": f"{__name__}:words_in_answer"}}})
    regrade.eval_dir.mkdir(parents=True)
    shutil.copy(config.eval_dir / "answers.jsonl", regrade.eval_dir / "answers.jsonl")
    lines = []
    rule = run_eval(regrade, log=lines.append)
    assert any("answers: 80 of 80 already on disk" in line for line in lines)
    assert not any("starting a vLLM engine" in line for line in lines) and rule["judgments"] == 160
    assert {j["judge"] for j in jsonl(regrade.eval_dir / "judgments.jsonl")} == {f"rule:{__name__}:words_in_answer"}

    # A re-run of the first job finds everything on disk.
    again = []
    run_eval(config, log=again.append)
    assert any("answers: 80 of 80 already on disk" in line for line in again)
    assert any("judgments: 160 of 160 already on disk" in line for line in again)
    assert not any("starting a vLLM engine" in line for line in again)


def words_in_answer(question: str, answer: str, reference) -> float:
    return float(len(answer.split()))
