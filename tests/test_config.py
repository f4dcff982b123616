"""Job configs: every kind of bad config fails before Ray starts, with a message that names the key."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tgdpo_ray.cli import main
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.config.loader import absolutize, apply_overrides, build_config, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def raw(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    model = tmp_path / "model"
    model.mkdir()
    return {
        "data": {"train": str(train)},
        "policy": {"model": str(model)},
        "guidance": {"model": str(model)},
    }


def error_of(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(copy.deepcopy(raw), "job.yaml", overrides)
    return str(info.value)


def test_valid_config_fills_defaults_and_absolute_paths(raw):
    config = build_config(raw)
    assert config.loss.type == "tgdpo" and config.loss.beta == 0.1 and config.loss.alpha == 0.5
    assert config.loss.clamp_weights is False
    assert config.reference_model == raw["policy"]["model"]
    assert Path(config.run.output_dir).is_absolute()
    assert config.data.train.split == "train"


def test_the_score_cache_lands_beside_the_runs_unless_a_folder_is_given(raw, tmp_path, monkeypatch):
    from tgdpo_ray.launch.pipeline import stage_config

    monkeypatch.chdir(tmp_path)  # the working directory of a job submitted from another folder
    config = build_config({**raw, "run": {"output_dir": "elsewhere/runs"}})
    assert config.scoring.cache_dir == str(tmp_path / "elsewhere" / "runs" / "cache")
    pipeline = build_config({"data": raw["data"], "policy": raw["policy"], "kind": "pipeline",
                             "run": {"output_dir": str(tmp_path / "out")}})
    assert stage_config(pipeline, "dpo").scoring.cache_dir == str(tmp_path / "out" / "cache")  # the stages share it
    given = build_config({**raw, "scoring": {"cache_dir": "shared/cache"}})
    assert given.scoring.cache_dir == str(tmp_path / "shared" / "cache")  # as given, from the working directory
    assert build_config({**raw, "scoring": {"cache_dir": "s3://bucket/cache"}}).scoring.cache_dir == \
        "s3://bucket/cache"


def test_unknown_top_level_key(raw):
    raw["trainig"] = {"epochs": 2}
    assert "trainig: unknown key" in error_of(raw)


def test_unknown_nested_key(raw):
    raw["policy"]["zero_stg"] = 3
    message = error_of(raw)
    assert "policy.zero_stg: unknown key" in message and "job.yaml" in message


def test_wrong_type(raw):
    raw["training"] = {"epochs": "many"}
    assert "training.epochs" in error_of(raw)


def test_out_of_range_value(raw):
    raw["policy"]["zero_stage"] = 5
    assert "policy.zero_stage" in error_of(raw)


def test_missing_required_key(raw):
    del raw["policy"]
    assert "(top level): kind train needs the section(s) policy" in error_of(raw)


def test_missing_data_path(raw, tmp_path):
    raw["data"]["train"] = str(tmp_path / "nope.jsonl")
    message = error_of(raw)
    assert "data.train.path: path does not exist" in message and "nope.jsonl" in message


def test_missing_model_path(raw, tmp_path):
    raw["guidance"]["model"] = str(tmp_path / "no-such-model")
    assert "guidance.model: path does not exist" in error_of(raw)


def test_hub_names_are_not_checked_on_disk(raw):
    raw["policy"]["model"] = "some-org/some-model"
    assert build_config(raw).policy.model == "some-org/some-model"


def test_tgdpo_needs_a_guidance_model(raw):
    del raw["guidance"]
    assert "guidance.model" in error_of(raw)
    assert build_config(raw, overrides=["loss.type=dpo"]).loss.type == "dpo"


def test_restarts_after_failures_need_checkpoints(raw):
    raw["training"] = {"keep_checkpoints": 0, "max_failures": 2}
    message = error_of(raw)
    assert "training" in message and "keep_checkpoints 0 saves none" in message
    assert build_config(raw, overrides=["training.max_failures=0"]).training.keep_checkpoints == 0


def test_prompt_limit_must_leave_room_for_answers(raw):
    raw["data"].update(max_length=64, max_prompt_length=64)
    assert "max_prompt_length (64) must be smaller than max_length (64)" in error_of(raw)


def test_the_layout_follows_the_trainers_devices(raw):
    """training.packing auto: shared_prompt where the policy trains on GPUs (the H100 measurement in README), padded
    on CPUs; the resolved layout is what the saved config names. FlexAttention and varlen are for packed rows only."""
    assert build_config(raw).training.packing == "padded"
    on_gpus = build_config(raw, overrides=["policy.gpus_per_worker=1"])
    assert on_gpus.training.packing == "shared_prompt" and on_gpus.training.attention == "auto"
    assert build_config(raw, overrides=["policy.gpus_per_worker=1", "training.packing=padded"]).training.packing == (
        "padded")
    message = error_of(raw, ["training.attention=flex"])
    assert "training.attention flex is for the packed layouts" in message and "JobConfig(" not in message
    flex_on_cpus = error_of(raw, ["training.attention=flex", "training.packing=packed"])
    assert "FlexAttention has no backward on CPUs" in flex_on_cpus
    assert build_config(raw, overrides=["training.attention=flex", "training.packing=packed",
                                        "policy.gpus_per_worker=1"]).training.attention == "flex"
    # varlen: packed rows only; on CPU trainers it runs (through SDPA); on GPUs its kernel needs half precision.
    assert "training.attention varlen is for the packed layouts" in error_of(raw, ["training.attention=varlen"])
    packed_varlen = ["training.attention=varlen", "training.packing=packed"]
    assert build_config(raw, overrides=packed_varlen).training.attention == "varlen"
    assert "policy would run on GPUs in fp32" in error_of(
        raw, [*packed_varlen, "policy.gpus_per_worker=1", "policy.precision=fp32"])
    assert "reference would run on GPUs in fp32" in error_of(
        raw, [*packed_varlen, "reference.gpus_per_replica=1", "reference.precision=fp32"])
    assert "training.compile is not supported with policy.zero_stage 3" in error_of(
        raw, ["training.compile=true", "policy.zero_stage=3"])


def test_replicas_range(raw):
    ranged = build_config(raw, overrides=["reference.replicas=[1, 4]"]).reference
    assert ranged.replicas == (1, 4) and ranged.replica_range == (1, 4)
    assert build_config(raw, overrides=["reference.replicas=3"]).reference.replica_range == (3, 3)
    assert "reference.replicas" in error_of(raw, ["reference.replicas=[3, 1]"])


def test_overrides(raw):
    before = json.dumps(raw, sort_keys=True)
    config = build_config(raw, overrides=["training.learning_rate=1e-6", "loss.type=dpo", "run.name=x"])
    assert config.training.learning_rate == 1e-6 and config.loss.type == "dpo" and config.run.name == "x"
    assert json.dumps(raw, sort_keys=True) == before  # loading never changes the caller's dict
    assert "training.lr: unknown key" in error_of(raw, ["training.lr=1"])
    assert "expected key=value" in error_of(raw, ["training.epochs"])
    assert "is a value, not a section" in error_of(raw, ["loss.type=dpo", "loss.type.x=1"])


def test_loading_never_changes_its_input(raw, eval_raw, tmp_path, monkeypatch):
    before = copy.deepcopy(eval_raw)
    changed = apply_overrides(eval_raw, ["eval.models.0.path=./elsewhere", "eval.judge.mode=pairwise", "run.x.y=1"])
    assert eval_raw == before  # nested dicts and lists included
    assert changed["eval"]["models"][0]["path"] == "./elsewhere" and changed["run"] == {"x": {"y": 1}}

    monkeypatch.chdir(tmp_path)
    raw["data"]["train"] = "./train.jsonl"
    relative = build_config(raw, check_paths=False)
    dumped = relative.model_dump()
    absolute = absolutize(relative)
    assert relative.model_dump() == dumped and relative.data.train.path == "./train.jsonl"
    assert absolute.data.train.path == str(tmp_path / "train.jsonl") and Path(absolute.run.output_dir).is_absolute()


def test_run_job_reads_and_validates_the_spec_once(raw, tmp_path, monkeypatch):
    from tgdpo_ray.config import loader as config_loader
    from tgdpo_ray.launch import pipeline

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    calls = []
    monkeypatch.setattr(config_loader, "apply_overrides", lambda *args: calls.append(args) or apply_overrides(*args))
    monkeypatch.setattr(pipeline, "run_train", lambda config, log: config)
    config = pipeline.run_job(str(spec), ["run.name=once", "loss.type=dpo"], kind="train")
    assert len(calls) == 1 and calls[0][1] == ["run.name=once", "loss.type=dpo", "kind=train"]
    assert config.run.name == "once" and config.loss.type == "dpo" and Path(config.run.output_dir).is_absolute()


def test_one_run_of_a_pipeline_spec_leaves_its_pipeline_stages_out_and_says_so(raw, tmp_path, monkeypatch):
    from tgdpo_ray.launch import pipeline

    raw.pop("guidance")
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(yaml.safe_dump({**raw, "kind": "pipeline", "sft": {"learning_rate": 1e-4},
                                    "eval": {"judge": {"model": "some-org/judge"}}}))
    monkeypatch.setattr(pipeline, "run_train", lambda config, log: config)
    printed = []
    config = pipeline.run_job(str(spec), ["loss.type=dpo"], kind="train", log=printed.append)
    assert config.kind == "train" and config.sft is None and config.eval is None
    assert printed == [f"[train] one train run of {spec}: its pipeline stages (sft, eval) are left out"]
    # Run as the pipeline it is, nothing is left out.
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, log: config)
    assert pipeline.run_job(str(spec), []).sft.learning_rate == 1e-4


def test_a_chat_template_file_stays_a_path_and_the_tokenizer_reads_it(raw, tiny_model, tmp_path, monkeypatch):
    from tgdpo_ray.modeling.loading import load_tokenizer
    from tgdpo_ray.modeling.tiny import CHATML_TEMPLATE

    monkeypatch.chdir(tmp_path)
    template = CHATML_TEMPLATE.replace("<|im_start|>", "<|im_end|>")
    (tmp_path / "template.jinja").write_text(template)
    config = build_config(raw, overrides=["data.chat_template=template.jinja"])
    assert config.data.chat_template == str(tmp_path / "template.jinja")
    assert load_tokenizer(tiny_model, chat_template=config.data.chat_template).chat_template == template
    assert load_tokenizer(tiny_model, chat_template=template).chat_template == template  # a template as it is


def test_readme_lists_every_key_with_its_description():
    """README's tables of keys are generated from the schema: run `python scripts/config_keys.py --write`."""
    spec = importlib.util.spec_from_file_location("config_keys", REPO / "scripts" / "config_keys.py")
    config_keys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_keys)
    assert not config_keys.undescribed_keys(), "every key needs Field(description=...)"
    readme = (REPO / "README.md").read_text()
    assert readme.count("<!-- config-keys: ") == 3  # job, eval, pairs
    assert config_keys.with_tables(readme) == readme, "README is stale: run python scripts/config_keys.py --write"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="job config not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_cli_prints_config_errors_without_a_traceback(raw, tmp_path, capsys):
    raw["policy"]["workers"] = 0
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "policy.workers" in err and "Traceback" not in err


def test_every_shipped_job_spec_is_valid():
    from tgdpo_ray.experiments.credit.spec import load_experiment

    # The experiment spec of `tgdpo-ray reproduce` is not a job: it holds the job sections its runs share.
    experiments = {REPO / "jobs" / name for name in ("reproduce.yaml", "reproduce-smollm2.yaml")}
    for path in experiments:
        experiment = load_experiment(str(path))
        assert experiment.seeds >= 5 and experiment.job["loss"] == {"beta": 0.1, "alpha": 0.5}
    specs = sorted(set((REPO / "jobs").glob("*.yaml")) - experiments)
    assert specs
    for spec in specs:
        # Schema only: the demo's model and data are built by `make demo`, so their paths may not exist yet.
        config = JobConfig.model_validate(yaml.safe_load(spec.read_text()))
        assert (config.eval.models if config.kind == "eval" else config.policy.model), spec


def test_a_tracker_whose_package_is_missing_fails_at_start(raw, monkeypatch):
    import importlib.util

    # make setup installs both trackers: hide one, as on a machine without the extra.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    assert "tracking.mlflow_experiment: needs the mlflow package (pip install 'tgdpo-ray[mlflow]')" in \
        error_of(raw, ["tracking.mlflow_experiment=e"])


def test_a_probe_names_an_importable_function_and_needs_whole_weights(raw):
    probe = ("training.probe={function: tgdpo_ray.experiments.credit.task:slot_probe, every: 4, "
             "arguments: {examples: x}}")
    config = build_config(raw, overrides=["loss.type=dpo", probe])
    assert config.training.probe.every == 4 and config.training.probe.arguments == {"examples": "x"}
    assert "training.probe.function: expected module:function (e.g. tgdpo_ray.experiments.credit.task:slot_probe) " \
           "(got 'slot_probe')" in error_of(
        raw, ["loss.type=dpo", "training.probe={function: slot_probe, every: 4}"])
    assert "training.probe.function tgdpo_ray.nowhere:f: cannot import it (ModuleNotFoundError" in error_of(
        raw, ["loss.type=dpo", "training.probe={function: 'tgdpo_ray.nowhere:f', every: 4}"])
    assert "training.probe.every" in error_of(raw, ["loss.type=dpo", probe.replace("every: 4", "every: 0")])
    assert "ZeRO-3 partitions" in error_of(raw, ["loss.type=dpo", "policy.zero_stage=3", probe])


# ---------------------------------------------------------------- eval sections


@pytest.fixture
def eval_raw(tmp_path):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return {"kind": "eval", "eval": {"models": [{"name": "a", "path": str(model)}, {"name": "b", "path": str(model)}],
                                     "judge": {"model": "some-org/judge"}}}


def test_an_eval_job_needs_no_data_or_policy_and_absolutizes_its_paths(eval_raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_raw["eval"]["models"][0]["path"] = "./model"
    config = build_config(eval_raw)
    assert config.eval.models[0].path == str(tmp_path / "model") and config.eval_dir == config.run_dir
    assert config.eval.questions.path == "shipped" and config.eval.generation.temperatures["writing"] == 0.7


@pytest.mark.parametrize("overrides, message", [
    (["eval.models=[]"], "kind eval needs eval.models"),
    (["eval.models.1.name=a"], "model names must be unique"),
    (["eval.judge.mode=pairwise", "eval.judge.baseline=c"], "judge: 'c' is not one of the evaluated models"),
    (["eval.judge.mode=pairwise", "eval.judge.pairs=[[a, z]]"], "judge: 'z' is not one of the evaluated models"),
    (["eval.judge.backend=openai"], "judge.backend openai needs judge.base_url"),
    (["eval.judge.parse_retries=-1"], "eval.judge.parse_retries"),
    (["eval.models.0.path=./no-such-model"], "eval.models.0.path: path does not exist"),
    (["eval.questions.path=missing.jsonl"], "eval.questions.path: path does not exist"),
    (["eval.judge.promts=x.jsonl"], "eval.judge.promts: unknown key"),
    (["eval.models.5.path=x"], "'5' is not an index of a list of 2"),
    (["eval.generation.on_gpus=false", "eval.generation.gpu_memory_utilization=0.05"],
     "gpu_memory_utilization applies to GPU engines only; with on_gpus: false set kv_cache_memory_bytes"),
    (["eval.judge.kv_cache_memory_bytes=lots"], "expected a size such as 268435456, 256MiB or 1GiB, got 'lots'"),
    (["eval.judge.backend=rule"], "judge.backend rule needs judge.function as module:function"),
    (["eval.judge.model=null"], "judge.backend vllm needs judge.model"),
    (["eval.judge.prompts=./no-prompts.jsonl"], "eval.judge.prompts: path does not exist"),
])
def test_bad_eval_sections_fail_naming_the_key(eval_raw, overrides, message):
    assert message in error_of(eval_raw, overrides)


def test_pairwise_needs_to_know_what_to_compare(eval_raw, tmp_path):
    eval_raw["eval"]["models"].append({"name": "c", "path": str(tmp_path / "model")})
    assert "set judge.baseline or judge.pairs" in error_of(eval_raw, ["eval.judge.mode=pairwise"])
    config = build_config(eval_raw, overrides=["eval.judge.mode=pairwise", "eval.judge.baseline=c"])
    assert config.eval.comparisons(["a", "b", "c"]) == [("a", "c"), ("b", "c")]


def test_the_pipeline_evaluates_after_training_and_its_stages_do_not(raw):
    from tgdpo_ray.launch.pipeline import stage_config

    raw.pop("guidance")
    raw.update(kind="pipeline", eval={"judge": {"model": "some-org/judge", "mode": "pairwise"}})
    config = build_config(raw)
    assert config.eval_dir == config.run_dir / "eval"
    assert config.eval.comparisons(config.eval.model_names(("tgdpo", "dpo"))) == [("tgdpo", "dpo")]
    stage = stage_config(config, "dpo")
    assert stage.kind == "train" and stage.eval is None
    assert "kind train does not evaluate" in error_of({**raw, "kind": "train", "guidance": {"model": "x"}})


def test_engine_memory_is_a_size_on_cpu_and_a_share_of_the_gpu_otherwise(eval_raw):
    config = build_config(eval_raw, overrides=["eval.generation.on_gpus=false",
                                                "eval.judge.kv_cache_memory_bytes=1.5GiB"])
    # CPU engines always get a size: 256 MiB unless set, whatever the machine's memory.
    assert config.eval.generation.kv_cache_bytes == 256 * 2**20
    assert config.eval.judge.kv_cache_bytes == int(1.5 * 2**30)
    gpu = build_config(eval_raw).eval.generation
    assert gpu.kv_cache_bytes is None and gpu.gpu_memory_share == 0.9  # vLLM sizes it on GPUs


def test_a_validated_config_written_out_validates_again(eval_raw, tmp_path):
    """config.yaml and check-config print every default: reading that back must give the same config."""
    from tgdpo_ray.config.loader import dump_config

    config = build_config(eval_raw, overrides=["eval.generation.on_gpus=false", "eval.judge.on_gpus=false"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_named_question_and_prompt_sets_are_not_paths(eval_raw):
    config = build_config(eval_raw, overrides=["eval.questions.path=mt_bench", "eval.judge.prompts=fastchat"])
    assert (config.eval.questions.path, config.eval.judge.prompts) == ("mt_bench", "fastchat")
    rule = build_config(eval_raw, overrides=["eval.judge.backend=rule", "eval.judge.model=null",
                                             "eval.judge.function=tgdpo_ray.experiments.demo:rule_score"])
    assert rule.eval.judge.identity == "rule:tgdpo_ray.experiments.demo:rule_score"


def test_the_loss_defaults_are_the_kernels_and_the_gpu_benchs():
    """bench/gpu.py measures TGDPOLoss() (it cannot read the pydantic schema on a bare torch image): the config's
    default loss section builds exactly that loss."""
    from tgdpo_ray.config.job import LossSection
    from tgdpo_ray.kernels.losses import TGDPOLoss, build_loss

    assert build_loss(LossSection()) == TGDPOLoss() == TGDPOLoss(beta=0.1, alpha=0.5, clamp_weights=False)


def test_keeping_the_best_checkpoint_needs_what_it_ranks_and_exports(raw):
    best = "training.keep_best={metric: eval/dpo_loss, mode: min}"
    assert "is a held-out metric, and data.eval is null" in error_of(raw, [best])
    assert "export best copies the best checkpoint's Hugging Face folder" in error_of(
        raw, ["training.keep_best={metric: loss, mode: min}", "training.export=best"])
    assert "keep_best chooses among checkpoints" in error_of(
        raw, ["training.keep_best={metric: loss, mode: min}", "training.keep_checkpoints=0"])
    config = build_config(copy.deepcopy(raw), "job.yaml", ["training.keep_best={metric: loss, mode: min}",
                                                           "training.export=best", "training.checkpoint_hf_export=true"])
    assert config.training.keep_best.metric == "loss" and config.training.export == "best"
