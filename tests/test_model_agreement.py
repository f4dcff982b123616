"""Models that must agree: scorer models share the policy's tokenizer and vocabulary (checked before Ray starts),
and scorers run in the policy's precision unless told otherwise."""

import shutil

import pytest

from tgdpo_ray.config.loader import build_config
from tgdpo_ray.experiments.demo import make_demo_model
from tgdpo_ray.modeling.loading import ModelMismatchError, check_models_agree, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A policy and scorer candidates: the BPE corpus is small, so vocab_size 400 is reached exactly and the
    seed alone changes which tokens it holds."""
    root = tmp_path_factory.mktemp("agreement")
    policy = make_demo_model(str(root / "policy"), seed=0, vocab_size=400)
    made = {
        "policy": policy,
        "other_vocabulary": make_demo_model(str(root / "other"), seed=1, vocab_size=400),
        "smaller": make_demo_model(str(root / "smaller"), seed=0, vocab_size=300),
        "reward_head": make_demo_model(str(root / "reward"), seed=0, vocab_size=400, token_reward_head=True),
        "other_reward_head": make_demo_model(str(root / "reward-other"), seed=1, vocab_size=400,
                                             token_reward_head=True),
    }
    shutil.copytree(policy, root / "copy")
    made["copy"] = root / "copy"
    # The policy's tokenizer with a larger embedding (a padded vocabulary): only config.vocab_size differs.
    bigger = load_causal_lm(str(policy), "fp32")
    bigger.resize_token_embeddings(512)
    bigger.save_pretrained(root / "bigger")
    load_tokenizer(str(policy)).save_pretrained(root / "bigger")
    made["bigger"] = root / "bigger"
    # The policy's tokenizer and weights with another end-of-sequence token.
    shutil.copytree(policy, root / "other_eos")
    tokenizer = load_tokenizer(str(policy))
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.save_pretrained(root / "other_eos")
    made["other_eos"] = root / "other_eos"
    return {name: str(path) for name, path in made.items()}


def config(models, demo_data, tmp_path, *overrides, loss="tgdpo", guidance="policy"):
    raw = {
        "run": {"name": "agree", "output_dir": str(tmp_path / "runs")},
        "data": {"train": {"path": str(demo_data["train"]), "limit": 8}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": loss},
        "policy": {"model": models["policy"]},
        "guidance": {"model": models[guidance]},
    }
    return build_config(raw, overrides=list(overrides))


@pytest.mark.parametrize("guidance, differs", [
    ("bigger", r"config\.vocab_size 512 vs 400"),
    ("smaller", r"config\.vocab_size 300 vs 400; tokenizer vocabulary hash \w+ vs \w+"),
    ("other_vocabulary", r": tokenizer vocabulary hash \w+ vs \w+ \("),
    ("other_eos", r": eos_token_id 1 vs 2 \("),
])
def test_a_guidance_model_with_another_vocabulary_fails(models, demo_data, tmp_path, guidance, differs):
    job = config(models, demo_data, tmp_path, guidance=guidance)
    with pytest.raises(ModelMismatchError, match=differs) as raised:
        check_models_agree(job)
    message = str(raised.value)
    assert message.startswith(f"guidance.model {models[guidance]} does not agree with policy.model "
                              f"{models['policy']}: ")
    assert "\n" not in message  # the CLI prints it as one line


def test_a_reference_model_with_another_vocabulary_fails(models, demo_data, tmp_path):
    job = config(models, demo_data, tmp_path, f"reference.model={models['smaller']}", loss="dpo")
    with pytest.raises(ModelMismatchError, match=r"^reference\.model .* config\.vocab_size 300 vs 400"):
        check_models_agree(job)


def test_a_token_reward_model_needs_the_policy_tokenizer(models, demo_data, tmp_path):
    source = "guidance.source=token_reward_model"
    check_models_agree(config(models, demo_data, tmp_path, source, guidance="reward_head"))
    with pytest.raises(ModelMismatchError, match="tokenizer vocabulary hash"):
        check_models_agree(config(models, demo_data, tmp_path, source, guidance="other_reward_head"))


def test_models_that_agree_or_are_the_policy_pass(models, demo_data, tmp_path, monkeypatch):
    # Another folder with the policy's tokenizer (as a DPO stage's output has) passes.
    check_models_agree(config(models, demo_data, tmp_path, f"reference.model={models['copy']}", guidance="copy"))

    def no_loading(*args, **kwargs):
        raise AssertionError("nothing to compare: no model should be loaded")

    monkeypatch.setattr("tgdpo_ray.modeling.loading.vocabulary_signature", no_loading)
    check_models_agree(config(models, demo_data, tmp_path))  # reference and guidance are the policy
    # Rewards from the data: no guidance model is read, whatever guidance.model says.
    check_models_agree(config(models, demo_data, tmp_path, "guidance.source=column", guidance="smaller"))


def test_run_train_fails_before_ray_starts(models, demo_data, tmp_path, monkeypatch):
    """Through the real entry point, as a pipeline's TGDPO stage would start with a mismatched guidance model."""
    from tgdpo_ray.train.driver import run_train

    def start_ray(config):
        raise AssertionError("Ray started before the models were checked")

    monkeypatch.setattr("tgdpo_ray.train.driver.start_ray", start_ray)
    job = config(models, demo_data, tmp_path, guidance="smaller")
    with pytest.raises(ModelMismatchError, match="config.vocab_size 300 vs 400"):
        run_train(job)
    assert not job.run_dir.exists()  # nothing was written either


def test_scorers_run_in_the_policy_precision_unless_set(models, demo_data, tmp_path):
    """An fp32 policy with bf16 scorers has a non-zero log-ratio at step 0: by default scorers take the policy's."""
    from tgdpo_ray.scoring.pools import add_scorer

    class Recorder:  # stands in for the Ray dataset: records how each scorer pool would be built
        def __init__(self):
            self.precisions = {}

        def map_batches(self, fn, fn_constructor_kwargs, **kwargs):
            self.precisions[fn_constructor_kwargs["role"]] = fn_constructor_kwargs["precision"]
            return self

    def precisions(*overrides):
        job = config(models, demo_data, tmp_path, *overrides)
        dataset = add_scorer(Recorder(), "reference", job.reference, job.reference_model, job, pad_id=0)
        return add_scorer(dataset, "guidance", job.guidance, job.guidance.model, job, pad_id=0).precisions

    assert precisions("policy.precision=fp32") == {"reference": "fp32", "guidance": "fp32"}
    assert precisions("policy.precision=bf16") == {"reference": "bf16", "guidance": "bf16"}
    assert precisions() == {"reference": "auto", "guidance": "auto"}  # both resolve alike on the same device
    # An explicit setting is kept.
    assert precisions("policy.precision=fp32", "reference.precision=bf16") == {"reference": "bf16",
                                                                               "guidance": "fp32"}
