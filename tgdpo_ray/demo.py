"""The demo's inputs, built on any machine without a model hub: synthetic preference data whose preferences
follow a token-level rule the code knows, and a tiny random model with its own tokenizer.

Each prompt asks to repeat or reverse a list of words. The chosen answer does it exactly; the rejected answer
gets one or two words wrong. Only those few tokens separate the two answers, which is the situation TGDPO's
token-level guidance is made for, and `rule_score` measures how well any answer follows the rule (the demo's
rule judge). The tests use the same model and data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from tgdpo_ray.jsonl import rewrite_records


def ensure_demo_inputs(model_dir: Path, data_dir: Path, log=print) -> None:
    """Builds what jobs/demo.yaml points at, when missing."""
    if not (model_dir / "config.json").exists():
        log(f"[demo] building the tiny model in {model_dir}")
        make_tiny_model(str(model_dir))
    if not all((data_dir / f"{name}.jsonl").exists() for name in ("train", "test", "questions")):
        log(f"[demo] writing demo preference data in {data_dir}")
        write_demo_data(str(data_dir))


# ---------------------------------------------------------------- the data


DEMO_WORDS = (
    "apple river stone cloud green quiet north seven paper light glass storm candle silver forest "
    "window orange thunder meadow pencil rocket garden winter yellow bridge castle dragon hammer "
    "island jungle ladder mirror needle ocean pillow rabbit saddle tiger violin wagon"
).split()
TASKS = {"Repeat": lambda words: words, "Reverse": lambda words: words[::-1]}


def make_pair(rng: random.Random) -> dict:
    task = rng.choice(sorted(TASKS))
    words = rng.sample(DEMO_WORDS, rng.randint(3, 7))
    answer = TASKS[task](words)
    wrong = list(answer)
    for position in rng.sample(range(len(wrong)), rng.randint(1, min(2, len(wrong)))):
        wrong[position] = rng.choice([w for w in DEMO_WORDS if w != answer[position]])
    return {"prompt": f"{task}: {' '.join(words)}", "chosen": " ".join(answer), "rejected": " ".join(wrong)}


def rule_score(prompt: str, response: str, reference: Optional[str] = None) -> float:
    """Fraction of answer positions that hold the word the rule asks for (0 for an unparseable prompt). The
    signature of a `rule` judge's function (eval.judge.function); the rule itself needs no reference."""
    task, _, text = prompt.partition(": ")
    if task not in TASKS:
        return 0.0
    expected = TASKS[task](text.split())
    given = response.split()
    hits = sum(1 for want, got in zip(expected, given) if want == got)
    return hits / max(len(expected), len(given), 1)


def write_demo_data(out_dir: str, train_pairs: int = 512, test_pairs: int = 64, seed: int = 0) -> dict[str, Path]:
    """Writes train.jsonl, test.jsonl (held-out pairs) and questions.jsonl under out_dir: the held-out prompts as
    MT-Bench-format questions of category `demo`, their chosen answers as references, for the evaluation."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {split: [make_pair(rng) for _ in range(count)] for split, count in (("train", train_pairs),
                                                                               ("test", test_pairs))}
    questions = [{"question_id": number, "category": "demo", "turns": [pair["prompt"]], "reference": [pair["chosen"]]}
                 for number, pair in enumerate(pairs["test"], start=1)]
    paths = {name: out / f"{name}.jsonl" for name in ("train", "test", "questions")}
    for name, rows in (*pairs.items(), ("questions", questions)):
        rewrite_records(paths[name], rows)
    return paths


# ---------------------------------------------------------------- the tiny model

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tokenizer_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text for training the tiny tokenizer: the demo vocabulary plus generic English-like words."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines // 2):
        pair = make_pair(rng)
        corpus += [pair["prompt"], pair["chosen"]]
    corpus += [" ".join(rng.choices(DEMO_WORDS, k=12)) for _ in range(lines // 4)]
    return corpus


def make_tiny_model(out_dir: str, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128, layers: int = 2,
                    token_reward_head: bool = False, corpus: Optional[list[str]] = None):
    """A random-initialised Llama (head_dim 64, which vLLM's CPU attention needs) with a locally trained BPE
    tokenizer and a ChatML template, saved in Hugging Face format. token_reward_head: a per-token scalar head
    (LlamaForTokenClassification, one label) instead of the LM head, for guidance.source: token_reward_model.
    corpus: the text the tokenizer is trained on; None: the demo's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Byte-level BPE: every string is encodable, so real prompts never hit an unknown token.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus or tokenizer_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    if token_reward_head:
        LlamaForTokenClassification(config).save_pretrained(out)
        return out
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return out
