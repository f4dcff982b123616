"""The model card's Hub metadata, read back with huggingface_hub's own parser (the whole card, with its scores, is
checked on a real pipeline in test_real_pipeline.py)."""

from huggingface_hub import ModelCard

from tgdpo_ray.config.loader import build_config
from tgdpo_ray.train.model_card import write_model_card

SUMMARY = {"steps": 12, "complete": True, "tokens": 3456, "eval": {"loss": 0.61, "reward_accuracy": 0.75},
           "eval_step": 12, "data_fingerprint": "abc123"}


def test_hub_names_become_card_metadata_and_the_body_says_how_the_model_was_made(tmp_path):
    config = build_config({"run": {"name": "dpo-uf", "output_dir": str(tmp_path)},
                           "policy": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                           "data": {"train": "trl-lib/ultrafeedback_binarized"},
                           "loss": {"type": "dpo", "beta": 0.05}, "training": {"learning_rate": 5e-7}})
    card = ModelCard.load(write_model_card(tmp_path, config, SUMMARY))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"] and card.data.tags == ["tgdpo-ray", "dpo"]
    for text in ("Loss: dpo, β 0.05", "learning rate 5e-07", "Steps: 12 (complete), 3456 tokens",
                 "fingerprint `abc123`", "## Held-out metrics (step 12)", "- reward_accuracy: 0.7500"):
        assert text in card.text, text
    assert "## Evaluation" not in card.text  # no evaluation ran
