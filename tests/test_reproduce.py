"""`tgdpo-ray reproduce`: the statistics on curves worked by hand, the spec's errors, and the whole experiment at
toy size through the real trainer (Ray Train + DeepSpeed, scorer pools, the score cache)."""

import gzip
import json
from pathlib import Path

import pytest
import yaml

from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.experiments.credit.report import (area, censored_comparison, contrast, headline_ratio, steps_to,
                                                 what_carries_the_loss)
from tgdpo_ray.experiments.credit.runner import (Experiment, ExperimentError, Run, Scheduler, publish,
                                                 run_experiment)
from tgdpo_ray.experiments.credit.spec import GUIDANCE_RUN, GUIDED, arms, load_experiment

SPEC = str(Path(__file__).resolve().parent.parent / "jobs" / "reproduce.yaml")


def curve(*accuracies, every=8):
    return [{"step": index * every, "slot_accuracy": value, "slot_probability": value / 2, "filler_kl": 0.1 * index}
            for index, value in enumerate(accuracies)]


def test_steps_to_an_accuracy_is_the_first_probe_at_or_above_it():
    points = curve(0.1, 0.5, 0.95, 0.8, 0.97)
    assert steps_to(points, 0.9) == 16 and steps_to(points, 0.96) == 32 and steps_to(points, 0.99) is None
    assert steps_to(points, 0.1) == 0


def test_the_headline_ratio_is_per_seed_then_averaged_and_says_why_a_seed_has_none():
    runs = {
        "dpo": {1: curve(0.1, 0.3, 0.6, 0.8), 2: curve(0.1, 0.5, 0.7, 0.7), 3: curve(0.2, 0.2, 0.2, 0.1),
                4: curve(0.1, 0.2, 0.4, 0.9)},
        GUIDED: {1: curve(0.1, 0.9, 0.9, 0.9), 2: curve(0.1, 0.2, 0.7, 0.9), 3: curve(0.2, 0.9, 0.9, 0.9),
                 4: curve(0.1, 0.2, 0.3, 0.5)},
    }
    ratio = headline_ratio(runs)
    # Seed 1: DPO reached its final 0.8 at step 24, the guided arm at 8; seed 2: 0.7 at 16 against 16.
    assert ratio["per_seed"] == [pytest.approx(8 / 24), 1.0, None, None]
    assert ratio["mean"] == pytest.approx((1 / 3 + 1) / 2) and ratio["n"] == 2 and ratio["of"] == 4
    assert ratio["interval"][0] <= ratio["mean"] <= ratio["interval"][1]
    assert ratio["notes"] == ["seed 3: DPO ended no higher than it started (slot accuracy 0.10); no ratio",
                              f"seed 4: {GUIDED} never reached DPO's final slot accuracy 0.90 (DPO took 24 steps)"]


def margins(*values, every=4, **training):
    return [{"step": index * every, "slot_margin": value, **{key: series[index] for key, series in training.items()}}
            for index, value in enumerate(values)]


def test_the_primary_analysis_is_a_paired_area_difference_with_an_exact_sign_flip_test():
    # Trapezoids over steps 0, 4, 8, divided by 8: (0 + 2)/2 * 4 + (2 + 2)/2 * 4 = 12, /8 = 1.5.
    assert area(margins(0.0, 2.0, 2.0)) == pytest.approx(1.5)
    runs = {"dpo": {seed: margins(-1.0, -1.0, -1.0) for seed in (1, 2, 3, 4, 5)},
            GUIDED: {seed: margins(-1.0, -1.0 + gain, -1.0 + gain) for seed, gain in
                     zip((1, 2, 3, 4, 5), (0.8, 0.4, 0.0, 0.4, -0.2))}}
    primary = contrast(runs, GUIDED, "dpo", alternative="greater")
    differences = [0.6, 0.3, 0.0, 0.3, -0.15]  # 3/4 of each gain: the area is 0 at step 0
    assert primary["per_seed"] == pytest.approx(differences)
    assert primary["mean"] == pytest.approx(sum(differences) / 5)
    assert primary["interval"][0] < primary["mean"] < primary["interval"][1]
    # 32 sign flips; a sum at least the observed 1.05: (+ + . + -) and (+ + . + +), each for both signs of the 0.
    assert primary["p_value"] == pytest.approx(4 / 32)


def test_steps_to_a_margin_keep_the_runs_that_never_reach_it_as_the_slowest():
    runs = {"dpo": {1: margins(-1, -0.5, 0.2), 2: margins(-1, -1, -1), 3: margins(-1, 0.1, 0.3)},
            GUIDED: {1: margins(-1, 0.1, 0.2), 2: margins(-1, -1, 0.5), 3: margins(-1, -1, -1)}}
    found = censored_comparison(runs, GUIDED, "dpo", target=0.0)
    assert found["per_seed"] == [[4, 8], [8, None], [None, 4]]
    assert (found["sooner"], found["later"], found["tied"]) == (2, 1, 0)
    assert found["p_value"] == pytest.approx(1.0)  # 2 of 3 differing seeds: exact two-sided sign test


def test_what_carries_the_loss_is_averaged_over_the_steps_after_the_start():
    parts = {"loss": [0.69, 0.5, 0.1], "z_dpo": [0.0, 0.2, 0.4], "z_guidance": [0.0, 1.0, 3.0],
             "weight_sum_gap": [0.0, -0.5, -1.5]}
    runs = {"dpo": {1: margins(0, 0, 0)}, GUIDED: {1: margins(0, 0, 0, **parts), 2: margins(0, 0, 0, **parts)}}
    table = what_carries_the_loss(runs)
    assert list(table) == [GUIDED]  # dpo logs no z parts
    assert table[GUIDED]["z_guidance"]["mean"] == pytest.approx(2.0)
    assert table[GUIDED]["weight_sum_gap"]["mean"] == pytest.approx(-1.0)
    assert table[GUIDED]["final_loss"]["per_seed"] == [0.1, 0.1]


def test_the_arms_follow_the_spec_and_its_errors_name_the_key(tmp_path):
    spec = load_experiment(SPEC, ["arms.lr_multipliers=[1, 3]", "arms.clamped_guidance=true"])
    assert [arm.name for arm in arms(spec)] == ["dpo", "dpo-lr3", "tgdpo-oracle", GUIDED, f"{GUIDED}-clamped",
                                                f"{GUIDED}-shuffled", f"{GUIDED}-centred", f"{GUIDED}-guarded",
                                                "tgdpo-shuffled"]
    options = [tuple(arm.loss_options.values()) for arm in arms(spec)]  # clamp, center, shuffle, normalize
    assert options == [(False,) * 4] * 4 + [(True, False, False, False), (False, False, True, False),
                                            (False, True, False, False), (True, True, False, True), (False,) * 4]
    assert [arm.name for arm in arms(load_experiment(SPEC, ["arms.dpo_only=true", "arms.repeat=null"]))] == ["dpo"]
    with pytest.raises(ConfigError, match=r"arms.lr_multipliers: lr_multipliers must .* including 1 \(got \[2, 4\]\)"):
        load_experiment(SPEC, ["arms.lr_multipliers=[2, 4]"])
    with pytest.raises(ConfigError, match="task.keyz: unknown key"):
        load_experiment(SPEC, ["task.keyz=3"])


def test_the_scheduler_keeps_the_order_runs_need_and_stops_at_the_first_failure():
    ran = []

    def execute(run):
        if run.name == "bad":
            raise ValueError("boom")
        ran.append(run.name)

    scheduler = Scheduler(2, execute)
    for name, after in (("first", []), ("bad", ["first"]), ("second", ["first"]), ("needs-bad", ["bad"])):
        scheduler.submit(Run(name, config=None, made_from=after))
    with pytest.raises(ExperimentError, match="run bad failed: boom"):
        scheduler.wait()
    assert ran[0] == "first" and "needs-bad" not in ran


SMALL = ["seeds=1", "task.train_pairs=16", "task.probe_answers_per_key=2", "warm_start.pairs=16",
       "warm_start.epochs=1", "guidance.epochs=1", "arms.lr_multipliers=[1]", "probe_every=1",
       "concurrent_runs=2", "job.training.max_pairs_per_batch=8",
       "arms.clamped_guidance=false", "arms.shuffled_control=false", "arms.shuffled_guidance=false",
       "arms.centred_guidance=false", "arms.guarded_guidance=false", "arms.repeat=null"]
# The toy run below: the dpo arm guides, as in the real spec (one training run fewer than a separate guidance run,
# whose configs test_every_arm_of_every_seed_is_a_run_of_its_own_config checks).
TOY = SMALL + ["guidance=null"]
REAL_SPEC = str(Path(SPEC).with_name("reproduce-smollm2.yaml"))


def test_every_arm_of_every_seed_is_a_run_of_its_own_config(tmp_path):
    """What the toy experiment below leaves out to save time: a second seed, dpo at other learning rates, the
    clamped arm, the shuffled control (its rewards: tests/test_credit_task.py)."""
    every_arm = ["seeds=2", "arms.lr_multipliers=[1, 2]", "arms.clamped_guidance=true", "arms.shuffled_control=true"]
    experiment = Experiment(load_experiment(SPEC, SMALL + [f"output_dir={tmp_path}"] + every_arm), SPEC)
    experiment.prepare(log=lambda _: None)
    runs = {run.name.split("/")[1]: run for run in experiment.seed_runs(1)}
    second = {run.name.split("/")[1]: run for run in experiment.seed_runs(2)}
    # Each seed has its own folder, data (its own f) and guidance model, and the same arms.
    assert set(second) == set(runs)
    assert second[GUIDED].config.guidance.model == str(tmp_path / "reproduce" / "seed-2" / GUIDANCE_RUN / "model")
    paths = [Path(seed["dpo"].config.data.train.path) for seed in (runs, second)]
    assert paths[0] != paths[1] and paths[0].read_text() != paths[1].read_text()
    assert set(runs) == {GUIDANCE_RUN, "dpo", "dpo-lr2", "tgdpo-oracle", GUIDED, f"{GUIDED}-clamped",
                         "tgdpo-shuffled"}
    learning_rate = runs["dpo"].config.training.learning_rate
    assert runs["dpo-lr2"].config.training.learning_rate == 2 * learning_rate
    assert runs["dpo-lr2"].config.loss.type == "dpo"
    assert runs["dpo-lr2"].after == ["warm-start", f"seed-1/{GUIDANCE_RUN}"]
    shuffled = runs["tgdpo-shuffled"].config.guidance
    assert shuffled.source == "column" and shuffled.reward_columns.chosen == "shuffled_chosen"
    clamped = runs[f"{GUIDED}-clamped"].config
    assert clamped.loss.clamp_weights and clamped.guidance.model == runs[GUIDED].config.guidance.model
    assert runs[GUIDED].made_from == ["warm-start", f"seed-1/{GUIDANCE_RUN}"]


def test_the_whole_experiment_at_toy_size_gives_every_arm_its_curve(ray_cluster, tmp_path):
    printed = []
    results = run_experiment(SPEC, TOY + [f"output_dir={tmp_path}"], log=printed.append)
    out = tmp_path / "reproduce"
    names = ["dpo", "tgdpo-oracle", GUIDED]
    assert results["seeds"] == {name: [1] for name in names}
    records = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    for name in names:
        steps = [r["step"] for r in records if r["run"] == name and r["seed"] == 1]
        assert steps == [0, 1, 2], name  # a probe before the first step, then after every one
    # Every arm of a seed starts from the same warm start on the same held-out answers.
    starts = {(r["seed"], r["slot_probability"]) for r in records if r["step"] == 0}
    assert len(starts) == 1
    ratio = results["tgdpo_steps_to_dpo_final_ratio"]
    assert set(ratio) >= {"mean", "interval", "per_seed", "n", "of"} and ratio["of"] == 1
    for name in ("reproduce.json", "report.md", "curves.png", "accuracy_vs_kl.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "reproduce.json").read_text())["seeds"] == results["seeds"]
    # Published: the JSON and plots as they are, the curves one line per run (what the committed copy holds).
    published = publish(tmp_path / "results", out, "toy")
    assert [path.name for path in published] == ["toy.json", "toy_curves.jsonl.gz", "toy_curves.png",
                                                 "toy_accuracy_vs_kl.png"]
    with gzip.open(published[1], "rt") as handle:
        compact = {(line["run"], line["seed"]): line for line in map(json.loads, handle)}
    assert set(compact) == {(name, 1) for name in names}
    assert compact[("dpo", 1)]["step"] == [0, 1, 2]
    dpo_margins = [r["slot_margin"] for r in records if r["run"] == "dpo"]
    assert compact[("dpo", 1)]["slot_margin"] == pytest.approx(dpo_margins, rel=1e-3)
    assert results["provenance"]["runs_trained"] == 1 + len(names) and results["code_commit"]
    assert "Primary: " + GUIDED + " minus dpo" in printed[-2]  # the table, then the primary analysis
    assert results["primary"]["p_value"] in (0.5, 1.0)  # one seed: the sign-flip test has two outcomes

    seed_one = out / "seed-1"
    # The oracle's rewards came with the data: no guidance pool ran.
    oracle = yaml.safe_load((seed_one / "tgdpo-oracle" / "config.yaml").read_text())
    assert oracle["guidance"]["source"] == "column"
    assert oracle["guidance"]["reward_columns"]["chosen"] == "oracle_chosen"
    assert not list((seed_one / "tgdpo-oracle" / "scoring").glob("guidance-*"))
    assert {json.loads(path.read_text())["role"] for path in (seed_one / "tgdpo-oracle" / "placement").glob("*")} \
        == {"policy", "reference", "tokenize"}
    # Every answer has the same tokens and one reward of +-c, so each token's weight is beta (1 + alpha r) and
    # a step's mean weight is beta (1 + alpha c / tokens) on both sides.
    pair = json.loads((seed_one / "data" / "train.jsonl").read_text().splitlines()[0])
    beta, alpha = oracle["loss"]["beta"], oracle["loss"]["alpha"]
    expected = beta * (1 + alpha * max(pair["oracle_chosen"]) / len(pair["oracle_chosen"]))
    steps = [json.loads(line) for line in (seed_one / "tgdpo-oracle" / "metrics.jsonl").read_text().splitlines()]
    for step in (record for record in steps if "loss" in record):
        assert step["chosen_weight_mean"] == pytest.approx(expected) == step["rejected_weight_mean"]
    guided = yaml.safe_load((seed_one / GUIDED / "config.yaml").read_text())
    assert guided["guidance"]["model"] == str(seed_one / "dpo" / "model")  # the seed's dpo arm guides
    assert results["guidance_check"]["run"] == "dpo"
    # A finished run keeps its model and metrics, not its checkpoints (1.5 GB each for SmolLM2).
    assert all((seed_one / name / "model").is_dir() and not (seed_one / name / "checkpoints" / name).exists()
               for name in names)

    # Started again, the experiment trains nothing and reports the same numbers.
    again = []
    assert run_experiment(SPEC, TOY + [f"output_dir={tmp_path}"], log=again.append)["runs"] == results["runs"]
    assert sum("already finished" in line for line in again) == 1 + len(names)


def test_the_real_spec_is_guided_by_its_dpo_arm_and_orders_the_runs_that_share_a_cache(smollm2, tmp_path):
    spec = load_experiment(REAL_SPEC, [f"output_dir={tmp_path}", f"model={smollm2}", "seeds=2"])
    experiment = Experiment(spec, REAL_SPEC)
    assert experiment.prepare(log=lambda _: None) is None  # no warm start: the pretrained model is the start
    runs = {run.name: run for seed in spec.seed_numbers for run in experiment.seed_runs(seed)}
    assert list(runs) == [f"seed-{seed}/{name}" for seed in (1, 2) for name in
                          ("dpo", "tgdpo-oracle", GUIDED, f"{GUIDED}-shuffled", f"{GUIDED}-centred")
                          + ((f"{GUIDED}-repeat",) if seed == 1 else ())]
    dpo, guided = runs["seed-1/dpo"].config, runs[f"seed-1/{GUIDED}"]
    assert runs["seed-1/dpo"].after == [] and dpo.policy.model == smollm2 and dpo.training.min_lr_ratio == 0.0
    assert guided.config.guidance.model == str(tmp_path / "reproduce_real" / "seed-1" / "dpo" / "model")
    assert guided.after == ["seed-1/dpo"]  # made from the dpo arm's final model
    for variant, option in (("shuffled", "shuffle_guidance"), ("centred", "center_guidance")):
        run = runs[f"seed-1/{GUIDED}-{variant}"]
        assert getattr(run.config.loss, option) and run.after == ["seed-1/dpo", f"seed-1/{GUIDED}"]
    assert runs[f"seed-1/{GUIDED}-repeat"].config.run.name == f"{GUIDED}-repeat"
    assert runs[f"seed-1/{GUIDED}-repeat"].after == ["seed-1/dpo", f"seed-1/{GUIDED}"]
    probe = dpo.training.probe.arguments
    assert (probe["marker"], probe["slot_line_tokens"], probe["reference"]) == (" is", 5, smollm2)
    with pytest.raises(ConfigError, match="colours starts from a pretrained model"):
        load_experiment(REAL_SPEC, ["model=null"])
    with pytest.raises(ConfigError, match="arms.repeat: no arm named 'dpo-lr9'"):
        load_experiment(REAL_SPEC, ["arms.repeat=dpo-lr9"])
