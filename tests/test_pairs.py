"""kind: pairs on a real local Ray with real vLLM engines (CPU build): answers sampled from the tiny model, ranked by a
rule, a sequence-classification reward model in a Ray Data pool, and an LLM judge; a stopped job resumes without
sampling finished prompts again."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import kill_engines

from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.data.preference import DataError
from tgdpo_ray.onpolicy.pairs import PairsError, Prompt, choose_pair, load_prompts, run_pairs

PROMPTS = 8
SAMPLES = 4


def answer_length(prompt: str, answer: str, reference) -> float:
    """A rule that tells the tiny model's random answers apart: longer is better."""
    return float(len(answer))


def pairs_config(tmp_path: Path, name: str, model: str, prompts: Path, ranker: dict, **pairs) -> object:
    return build_config({"kind": "pairs", "run": {"name": name, "output_dir": str(tmp_path), "seed": 3},
                         "pairs": {"prompts": str(prompts), "model": model, "num_samples": SAMPLES,
                                   "temperature": 1.0, "max_new_tokens": 12, "prompts_per_batch": 4,
                                   "generation": {"on_gpus": False, "max_model_len": 256, "enforce_eager": True},
                                   "ranker": ranker, **pairs}})


def jsonl(path: Path) -> list[dict]:
    return read_records(path)


@pytest.fixture(scope="module")
def prompts_file(demo_data, tmp_path_factory) -> Path:
    rows = jsonl(demo_data["train"])[:PROMPTS]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    # Text prompts and chat-message prompts alike; a reference column reaches a rule as its third argument.
    prompts = [row["prompt"] if i % 2 else [{"role": "user", "content": row["prompt"]}] for i, row in enumerate(rows)]
    path.write_text("".join(json.dumps({"prompt": prompt, "reference": f"ref-{i}"}) + "\n"
                            for i, prompt in enumerate(prompts)))
    return path


@pytest.fixture(scope="module")
def by_rule(ray_cluster, tiny_model, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    config = pairs_config(out, "rule", tiny_model, prompts_file,
                          {"type": "rule", "function": f"{__name__}:answer_length"})
    lines: list[str] = []
    report = run_pairs(config, log=lines.append)
    return {"config": config, "report": report, "lines": lines, "run_dir": config.run_dir}


def test_the_best_and_the_worst_of_each_prompts_answers_become_chosen_and_rejected(by_rule, prompts_file):
    run_dir, report = by_rule["run_dir"], by_rule["report"]
    samples = {r["prompt_index"]: r for r in jsonl(run_dir / "samples.jsonl")}
    pairs = jsonl(run_dir / "pairs.jsonl")
    assert len(samples) == PROMPTS and all(len(r["answers"]) == SAMPLES for r in samples.values())
    assert report["pairs"] == len(pairs) > 0 and report["pairs"] + sum(report["skipped"].values()) == PROMPTS
    sources = jsonl(prompts_file)
    for pair in pairs:
        record = samples[pair["prompt_index"]]
        answers = record["answers"]
        # An empty answer is a failed one (no pair can hold it): it gets no score.
        assert record["errors"] == [None if answer.strip() else "empty answer" for answer in answers]
        lengths = [None if error else float(len(answer)) for answer, error in zip(answers, record["errors"])]
        scored = [length for length in lengths if length is not None]
        assert pair["scores"] == lengths and len(pair["chosen"]) == max(scored)
        assert pair["chosen_score"] == max(scored) > pair["rejected_score"] == min(scored)
        assert answers[pair["chosen_sample"]] == pair["chosen"] and answers[pair["rejected_sample"]] == pair["rejected"]
        source = sources[pair["prompt_index"]]
        assert pair["prompt"] == source["prompt"] and pair["reference"] == source["reference"]
        assert pair["ranker"] == f"rule:{__name__}:answer_length" and pair["num_samples"] == SAMPLES
    # Each batch was on disk with a progress line before the next; the answers of a prompt differ (own seeds).
    assert [line for line in by_rule["lines"] if "sampled" in line][-1].startswith("[pairs] sampled 8/8 prompts")
    assert samples and all(len(set(r["answers"])) > 1 for r in samples.values())


def test_a_stopped_job_resumes_without_sampling_finished_prompts_again(by_rule, tmp_path):
    """And its engine, killed between its two batches, is started again: the samples are still those of a job
    never stopped, each prompt's once."""
    first = by_rule["run_dir"]
    config = by_rule["config"].model_copy(deep=True)
    config.run.output_dir = str(tmp_path)
    config.pairs.prompts_per_batch = 2  # the four prompts left in two batches
    resumed = config.run_dir
    resumed.mkdir(parents=True)
    # Stopped while sampling its second batch (a half-written line at the end) and before ranking anything.
    first_batch = (first / "samples.jsonl").read_text().splitlines()[:4]
    (resumed / "samples.jsonl").write_text("\n".join(first_batch) + '\n{"prompt_index": 5, "answ')
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "[pairs] sampled 2/4 prompts" in line:  # the engine's first batch is on disk
            assert kill_engines() == 1

    run_pairs(config, log=log)
    assert "[pairs] samples: 4 of 8 prompts already on disk, reused" in lines
    assert "[pairs] sampled 4/4 prompts" in " ".join(lines)
    [restart] = [line for line in lines if "was lost (" in line]
    assert restart.startswith("[pairs] vLLM engine for ") and restart.endswith("starting it again (restart 1 of 3)")
    # Every answer has its own seed: the resumed job wrote the same samples and pairs as the uninterrupted one.
    assert len((resumed / "samples.jsonl").read_text().splitlines()) == PROMPTS + 1  # the cut line stays, alone
    same = [sorted(map(json.dumps, jsonl(run / "samples.jsonl"))) for run in (resumed, first)]
    assert same[0] == same[1]
    assert jsonl(resumed / "pairs.jsonl") == jsonl(first / "pairs.jsonl")
    # Run again with everything on disk: no engine starts, nothing is ranked again.
    lines.clear()
    run_pairs(config, log=lines.append)
    assert not any("starting a vLLM engine" in line or line.startswith("[pairs] ranked") for line in lines)
    assert "[pairs] scores: 8 of 8 prompts already on disk, reused" in lines


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> str:
    """A random sequence-classification head (one label) on the tiny Llama, with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return str(folder)


def reuse_samples(by_rule, config) -> None:
    config.run_dir.mkdir(parents=True)
    shutil.copy(by_rule["run_dir"] / "samples.jsonl", config.run_dir / "samples.jsonl")


def test_a_reward_model_in_a_ray_data_pool_ranks_the_answers(by_rule, tiny_model, reward_model, prompts_file, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = pairs_config(tmp_path, "reward", tiny_model, prompts_file,
                          {"type": "reward_model", "reward_model": {"model": reward_model, "replicas": 2,
                                                                    "batch_size": 5, "precision": "fp32"}})
    reuse_samples(by_rule, config)
    lines: list[str] = []
    report = run_pairs(config, log=lines.append)
    assert not any("starting a vLLM engine" in line for line in lines)  # the rule run's samples were reused
    scores = {r["prompt_index"]: r["scores"] for r in jsonl(config.run_dir / "scores.jsonl")}
    samples = {r["prompt_index"]: r for r in jsonl(config.run_dir / "samples.jsonl")}
    assert len(scores) == PROMPTS
    for index, record in samples.items():  # every answer scored, but the empty ones
        assert [score is None for score in scores[index]] == [error is not None for error in record["errors"]]
    # Every score is the model's output for that very conversation, in the model's chat template.
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    prompts, _ = load_prompts(config.pairs)
    for prompt in prompts[:2]:
        for sample in [s for s, error in enumerate(samples[prompt.index]["errors"]) if error is None][:2]:
            answer = samples[prompt.index]["answers"][sample]
            conversation = prompt.messages + [{"role": "assistant", "content": answer}]
            ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False,
                            return_tensors="pt")
            with torch.no_grad():
                expected = model(**ids).logits[0, 0].item()
            assert scores[prompt.index][sample] == pytest.approx(expected, abs=1e-4)
    pairs = jsonl(config.run_dir / "pairs.jsonl")
    assert report["pairs"] == len(pairs) == PROMPTS - report["skipped"]["failed"]  # real-valued scores never tie
    for pair in pairs:
        assert pair["chosen_score"] == max(s for s in scores[pair["prompt_index"]] if s is not None)
        assert pair["ranker"] == f"reward_model:{reward_model}"


def test_an_llm_judge_grades_every_answer_and_unparseable_verdicts_are_counted(by_rule, tiny_model, prompts_file,
                                                                               tmp_path):
    """The tiny judge never writes a [[rating]]: every answer is asked (and asked again once), none is scored, and
    every prompt is skipped as failed, which the job says, naming the count."""
    config = pairs_config(tmp_path, "judge", tiny_model, prompts_file,
                          {"type": "judge", "judge": {"backend": "vllm", "model": tiny_model, "on_gpus": False,
                                                      "max_model_len": 2048, "enforce_eager": True,
                                                      "max_tokens": 8, "parse_retries": 1}})
    reuse_samples(by_rule, config)
    with pytest.raises(PairsError, match="no pairs: none of the 8 prompts has two answers with different scores "
                                         r"\(0 ties, 8 with fewer than two scored answers"):
        run_pairs(config, log=lambda _: None)
    records = jsonl(config.run_dir / "scores.jsonl")
    samples = {r["prompt_index"]: r for r in jsonl(config.run_dir / "samples.jsonl")}
    assert len(records) == PROMPTS
    for record in records:
        assert record["scores"] == [None] * SAMPLES
        sampled_errors = samples[record["prompt_index"]]["errors"]
        for text, error, sampled in zip(record["judge_texts"], record["errors"], sampled_errors):
            if sampled:  # an empty answer is never sent to the judge
                assert (text, error) == (None, "empty answer")
            else:
                assert isinstance(text, str) and error.startswith(("no [[rating]]", "several", "rating"))
    report = json.loads((config.run_dir / "pairs_report.json").read_text())
    assert report["failed_answers"] == PROMPTS * SAMPLES and report["skipped"]["failed"] == PROMPTS


def test_ties_and_failed_answers_are_skipped_and_the_lowest_sample_wins_a_shared_best():
    prompt = Prompt(0, "line 1", [{"role": "user", "content": "q"}], "q", None)
    samples = {"answers": ["a", "b", "c"], "finish_reasons": ["stop"] * 3}
    pair, why = choose_pair(prompt, samples, {"scores": [2.0, 2.0, 1.0]})
    assert why is None and (pair["chosen"], pair["rejected"]) == ("a", "c")
    assert choose_pair(prompt, samples, {"scores": [1.0, 1.0, 1.0]}) == (None, "tie")
    assert choose_pair(prompt, samples, {"scores": [None, 1.0, None]}) == (None, "failed")
    same_text = {"answers": ["a", "a", "c"], "finish_reasons": ["stop"] * 3}
    assert choose_pair(prompt, same_text, {"scores": [3.0, 1.0, None]}) == (None, "tie")


def test_a_bad_prompt_names_its_file_and_line_or_is_counted(tmp_path, tiny_model):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": ""}\n{"text": "no prompt"}\nnot json\n')
    config = pairs_config(tmp_path, "bad", tiny_model, path, {"type": "rule", "function": f"{__name__}:answer_length"})
    with pytest.raises(DataError, match=r"prompts.jsonl: line 3: empty_field: prompt is empty \(set pairs.bad_rows"):
        load_prompts(config.pairs)
    config.pairs.bad_rows = "skip"
    prompts, skipped = load_prompts(config.pairs, log=lambda _: None)
    assert [p.index for p in prompts] == [0] and skipped == {"empty_field": 1, "missing_field": 1, "invalid_json": 1}


def test_the_pairs_section_is_checked_before_anything_starts(tmp_path, tiny_model, prompts_file):
    from tgdpo_ray.config.base import ConfigError

    with pytest.raises(ConfigError, match="ranker.type judge needs ranker.judge"):
        pairs_config(tmp_path, "x", tiny_model, prompts_file, {"type": "judge"})
    with pytest.raises(ConfigError, match="pairs.ranker.function tgdpo_ray.nothing:here: cannot import it"):
        pairs_config(tmp_path, "x", tiny_model, prompts_file, {"type": "rule", "function": "tgdpo_ray.nothing:here"})
    with pytest.raises(ConfigError, match="pairs.prompts.path: path does not exist"):
        pairs_config(tmp_path, "x", tiny_model, tmp_path / "none.jsonl", {"type": "rule", "function": "a:b"})
    with pytest.raises(ConfigError, match="kind train does not generate pairs"):
        build_config({"kind": "train", "data": {"train": str(prompts_file)}, "policy": {"model": tiny_model},
                      "pairs": {"prompts": str(prompts_file), "ranker": {"type": "rule", "function": "a:b"}}})
    with pytest.raises(ConfigError, match="trains on the pairs it generates: remove data.train"):
        build_config({"kind": "pipeline", "data": {"train": str(prompts_file)}, "policy": {"model": tiny_model},
                      "pairs": {"prompts": str(prompts_file), "ranker": {"type": "rule", "function": "a:b"}}})
