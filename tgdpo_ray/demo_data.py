"""Synthetic preference data whose preferences follow a token-level rule the code knows.

Each prompt asks to repeat or reverse a list of words. The chosen answer does it exactly; the rejected answer
gets one or two words wrong. Only those few tokens separate the two answers, which is the situation TGDPO's
token-level guidance is made for, and `rule_score` measures how well any answer follows the rule.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

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
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths
