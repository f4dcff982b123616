"""The tiny model the demo and tests use: real Hugging Face files, a working chat template, vLLM-ready shape."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tgdpo_ray.cli import main


def test_make_tiny_model_cli_builds_a_loadable_llama(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-tiny-model", str(out), "--seed", "1"]) == 0
    assert "written to" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.head_dim == 64  # vLLM's CPU attention needs head_dim >= 64
    assert (out / "model.safetensors").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat: apple"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    # Any text encodes (byte-level BPE): no unknown tokens for prompts outside the demo vocabulary.
    text = "Ünïcode & symbols {}[] 12345"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_same_seed_same_weights(tmp_path):
    from tgdpo_ray.experiments.demo import make_demo_model

    a = AutoModelForCausalLM.from_pretrained(make_demo_model(str(tmp_path / "a"), seed=5))
    b = AutoModelForCausalLM.from_pretrained(make_demo_model(str(tmp_path / "b"), seed=5))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_make_demo_data_cli(tmp_path, capsys):
    assert main(["make-demo-data", str(tmp_path), "--train-pairs", "7", "--test-pairs", "3"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 7
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 3
