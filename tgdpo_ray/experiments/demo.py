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

from tgdpo_ray.common.jsonl import rewrite_records
from tgdpo_ray.config.loader import load_config, read_raw_config
from tgdpo_ray.modeling.tiny import make_tiny_model


def prepare_demo_job(config_path: str, overrides: list[str], log=print) -> None:
    """Builds what a demo spec (`kind: demo` in its file) points at, when missing, whatever kind a command runs it
    as (`tgdpo-ray train --config jobs/demo.yaml` trains on the demo's inputs); a spec of another kind needs
    nothing."""
    raw = read_raw_config(config_path)
    if not (isinstance(raw, dict) and raw.get("kind") == "demo"):
        return
    config = load_config(config_path, overrides, check_paths=False)
    ensure_demo_inputs(Path(config.policy.model), Path(config.data.train.path).parent, log)


def ensure_demo_inputs(model_dir: Path, data_dir: Path, log=print) -> None:
    """Builds what jobs/demo.yaml points at, when missing."""
    if not (model_dir / "config.json").exists():
        log(f"[demo] building the tiny model in {model_dir}")
        make_demo_model(str(model_dir))
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

def tokenizer_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text for training the tiny tokenizer: the demo vocabulary plus generic English-like words."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines // 2):
        pair = make_pair(rng)
        corpus += [pair["prompt"], pair["chosen"]]
    corpus += [" ".join(rng.choices(DEMO_WORDS, k=12)) for _ in range(lines // 4)]
    return corpus


def make_demo_model(out_dir: str, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128, layers: int = 2,
                    token_reward_head: bool = False):
    """The tiny model (modeling/tiny.py) with its tokenizer trained on the demo's text: the demo's and the tests'
    model."""
    return make_tiny_model(out_dir, tokenizer_corpus(seed), seed, vocab_size, hidden_size, layers, token_reward_head)
