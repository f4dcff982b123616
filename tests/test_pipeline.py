"""The pipeline's stages as configs, its training table and its one-line verdict (no Ray: the stages themselves
run in tests/test_real_pipeline.py and `make demo`)."""

import pytest

from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.launch.pipeline import stage_config, summary_table, verdict


def pipeline(tmp_path, **extra):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "model").mkdir(exist_ok=True)
    return build_config({"kind": "pipeline", "run": {"name": "p", "output_dir": str(tmp_path)},
                         "data": {"train": str(train)}, "policy": {"model": str(tmp_path / "model")},
                         "training": {"epochs": 3, "learning_rate": 1e-6}, **extra})


def test_an_sft_stage_comes_first_and_both_preference_stages_start_from_its_policy(tmp_path):
    config = pipeline(tmp_path, sft={"epochs": 2, "learning_rate": 1e-4})
    assert config.pipeline_models == ("tgdpo", "dpo", "sft")
    sft = stage_config(config, "sft")
    assert (sft.kind, sft.loss.type, sft.run.name, sft.sft) == ("train", "sft", "sft", None)
    assert (sft.training.epochs, sft.training.learning_rate) == (2, 1e-4)  # the section's, the rest of training
    dpo = stage_config(config, "dpo", start="runs/sft/model")
    assert dpo.policy.model == dpo.reference.model == "runs/sft/model"  # the SFT policy is also the reference
    assert (dpo.training.epochs, dpo.training.learning_rate) == (3, 1e-6)
    # Without the section the stages start from policy.model, and only a pipeline or the demo has an SFT stage.
    assert stage_config(pipeline(tmp_path), "dpo").policy.model == str(tmp_path / "model")
    assert pipeline(tmp_path).pipeline_models == ("tgdpo", "dpo")
    raw = {"data": {"train": str(tmp_path / "train.jsonl")}, "policy": {"model": str(tmp_path / "model")},
           "loss": {"type": "dpo"}, "sft": {"learning_rate": 1e-4}}
    with pytest.raises(ConfigError, match="kind train has no SFT stage"):
        build_config(raw)


def test_the_training_table_says_none_where_a_run_had_no_held_out_pairs():
    table = summary_table({"dpo": {"final_train_loss": 0.5, "tokens_per_second": 100.0, "eval": None},
                           "tgdpo": {"final_train_loss": 0.4, "tokens_per_second": 90.0,
                                     "eval": {"loss": 0.6, "dpo_loss": 0.65, "reward_accuracy": 0.7}}})
    dpo, tgdpo = table.splitlines()[1:]
    assert dpo.split() == ["dpo", "0.5000", "none", "none", "none", "100"] and "nan" not in table
    assert tgdpo.split() == ["tgdpo", "0.4000", "0.6000", "0.6500", "0.700", "90"]


def single(model_a, model_b, difference, low, high):
    return {"scores": {"paired_differences": [
        {"model_a": "sft", "model_b": "dpo", "mean_difference": 0.9, "ci": [0.8, 1.0], "n_questions": 64},
        {"model_a": model_a, "model_b": model_b, "mean_difference": difference, "ci": [low, high],
         "n_questions": 64}]}}


def test_the_verdict_reads_tgdpo_against_dpo_whichever_order_and_says_what_its_interval_shows():
    held = verdict(single("tgdpo", "dpo", 0.02, -0.03, 0.07))
    assert held.startswith("[pipeline] verdict: tgdpo - dpo mean score +0.020 [-0.030, +0.070] over 64 questions")
    assert "no difference is shown" in held and "does not say how often" in held
    # The other order: the difference and its interval change sign.
    assert "+0.050 [+0.010, +0.090]" in verdict(single("dpo", "tgdpo", -0.05, -0.09, -0.01))
    assert "tgdpo did better than dpo" in verdict(single("dpo", "tgdpo", -0.05, -0.09, -0.01))
    assert "tgdpo did worse than dpo" in verdict(single("tgdpo", "dpo", -0.05, -0.09, -0.01))
    pairwise = {"scores": None, "pairwise": {"comparisons": [
        {"model_a": "tgdpo", "model_b": "dpo", "net": 0.25, "net_ci": [0.1, 0.4], "n_questions": 2}]}}
    assert "tgdpo's net wins against dpo +0.250 [+0.100, +0.400] over 2 questions: tgdpo did better" in \
        verdict(pairwise)
    assert "no comparison of tgdpo and dpo" in verdict({"scores": {"paired_differences": []}})
    undecided = {"scores": None, "pairwise": {"comparisons": [
        {"model_a": "tgdpo", "model_b": "dpo", "net": float("nan"), "net_ci": [None, None], "n_questions": 0}]}}
    assert "decided no question" in verdict(undecided)


def test_the_verdict_names_a_t_interval_and_says_when_there_is_none():
    # Under 10 questions: the mean difference has a t-interval, and says so; net wins have no interval.
    summary = single("tgdpo", "dpo", 0.5, 0.1, 0.9)
    summary["scores"]["paired_differences"][1].update(ci_method="t", n_questions=4)
    assert "+0.500 [+0.100, +0.900] t-interval (n < 10 questions) over 4 questions: tgdpo did better" in \
        verdict(summary)
    pairwise = {"scores": None, "pairwise": {"comparisons": [
        {"model_a": "dpo", "model_b": "tgdpo", "net": -0.25, "net_ci": None, "ci_method": "none", "n_questions": 4}]}}
    assert verdict(pairwise) == ("[pipeline] verdict: tgdpo's net wins against dpo +0.250 over 4 questions, too few "
                                 "for an interval: no difference is shown")
