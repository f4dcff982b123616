"""Verifiable instructions, in the spirit of IFEval (Zhou et al. 2023): prompts this project generates itself, each
with the rules that check an answer to it, so that a model can be trained on on-policy pairs ranked by a rule and
evaluated by how often it follows the constraints on prompts it never saw.

A prompt is a short task about a simple topic ("Write a short note about tea.") followed by one or two constraint
sentences ("Do not use any commas. Use no more than 20 words."). Each constraint kind has a name, a function that
draws its parameters from a `random.Random`, a function that says it as an instruction, and a checker
`(answer, params) -> bool`. The tasks are easy enough that a small instruction model (SmolLM2-135M-Instruct)
follows the constraints some of the time, so sampling several answers gives a mix of passing and failing ones.

Held-out prompts are new in two ways: their topics are not train topics, and every held-out prompt with two
constraints uses a pair of kinds that no train prompt uses (a fixed quarter of the allowed pairs). A single
constraint may appear in both splits, on disjoint topics.

A prompt's record carries its constraints as a compact JSON list, its `reference`: the rule functions
`instruction_score` and `prompt_followed` read it as their third argument, the signature of a rule judge
(eval.judge.function) and of the pairs rule ranker, f(prompt, answer, reference). An empty or whitespace-only
answer follows nothing and scores 0.0 (even for constraints it would pass vacuously, such as `no_commas`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tgdpo_ray.common.jsonl import rewrite_records

# ---------------------------------------------------------------- reading an answer

WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z0-9]+)*")
# A sentence ends at ., ! or ? (one or more) followed by whitespace or the end of the answer. Simple on purpose:
# "Mr. Smith" counts as two sentences, a last sentence without its full stop still counts as one.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
# A markdown bullet: "* " or "- " at the start of a line (leading spaces allowed, so nested bullets count too).
BULLET_LINE = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)
# The whole answer inside one code fence, ```json ... ``` or ``` ... ```.
CODE_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
QUOTE_PAIRS = (('"', '"'), ("“", "”"))
PUNCTUATION = "\"'“”‘’.,;:!?()[]{}*-_`~"


def words(answer: str) -> list[str]:
    """Runs of letters and digits (an apostrophe inside a word keeps it whole): markdown marks are not words."""
    return WORD.findall(answer)


def sentences(answer: str) -> list[str]:
    """The pieces between sentence ends that hold a letter or a digit (so a closing quote is not a sentence)."""
    return [piece for piece in SENTENCE_END.split(answer.strip()) if any(c.isalnum() for c in piece)]


def has_word(answer: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) is not None


def first_word(answer: str) -> str:
    """The first whitespace-separated token, lowercased, with the punctuation around it stripped."""
    tokens = answer.split()
    return tokens[0].strip(PUNCTUATION).lower() if tokens else ""


def parses_as_json(answer: str) -> bool:
    text = answer.strip()
    fenced = CODE_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def is_quoted(answer: str) -> bool:
    text = answer.strip()
    return len(text) >= 2 and any(text.startswith(left) and text.endswith(right) for left, right in QUOTE_PAIRS)


# ---------------------------------------------------------------- the constraint kinds

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Words to include or avoid: common enough that a short answer might use them, none of them a start word or a
# word of an ending phrase (`conflicting` checks that anyway).
KEYWORDS = ("bright", "simple", "happy", "because", "always", "small", "together", "very", "really", "good", "also",
            "many")
START_WORDS = ("Today", "Yes", "Well", "Imagine", "Honestly", "First")
# Ending phrases without commas, so that they combine with no_commas.
END_PHRASES = ("That is all for now.", "Thanks for reading!", "I hope this helps.", "Have a great day!",
               "Any other questions?")
MAX_WORDS = (10, 20, 30, 50)
MIN_WORDS = (8, 15, 25, 40)


@dataclass(frozen=True)
class ConstraintKind:
    name: str
    params: tuple[str, ...]  # the names of its parameters, in the constraint record next to "kind"
    draw: Callable[[random.Random], dict]
    render: Callable[[dict], str]  # the instruction sentence
    check: Callable[[str, dict], bool]  # (answer, params) -> followed?


def no_params(rng: random.Random) -> dict:
    return {}


def sentence_count_text(params: dict) -> str:
    count = params["count"]
    return f"Answer in exactly {NUMBER_WORDS.get(count, count)} sentence{'s' if count != 1 else ''}."


KIND_LIST = [
    ConstraintKind(
        "lowercase", (), no_params,
        lambda p: "Write your entire answer in lowercase letters, with no capital letters at all.",
        lambda answer, p: any(c.isalpha() for c in answer) and not any(c.isupper() for c in answer)),
    ConstraintKind(
        "uppercase", (), no_params,
        lambda p: "Write your entire answer in capital letters.",
        lambda answer, p: any(c.isalpha() for c in answer) and not any(c.islower() for c in answer)),
    ConstraintKind(
        "include_keyword", ("word",), lambda rng: {"word": rng.choice(KEYWORDS)},
        lambda p: f'Use the word "{p["word"]}" somewhere in your answer.',
        lambda answer, p: has_word(answer, p["word"])),
    ConstraintKind(
        "exclude_word", ("word",), lambda rng: {"word": rng.choice(KEYWORDS)},
        lambda p: f'Do not use the word "{p["word"]}" anywhere in your answer.',
        lambda answer, p: not has_word(answer, p["word"])),
    ConstraintKind(
        "no_commas", (), no_params,
        lambda p: "Do not use any commas.",
        lambda answer, p: "," not in answer),
    ConstraintKind(
        "sentence_count", ("count",), lambda rng: {"count": rng.randint(1, 3)},
        sentence_count_text,
        lambda answer, p: len(sentences(answer)) == p["count"]),
    ConstraintKind(
        "max_words", ("count",), lambda rng: {"count": rng.choice(MAX_WORDS)},
        lambda p: f"Use no more than {p['count']} words.",
        lambda answer, p: len(words(answer)) <= p["count"]),
    ConstraintKind(
        "min_words", ("count",), lambda rng: {"count": rng.choice(MIN_WORDS)},
        lambda p: f"Use at least {p['count']} words.",
        lambda answer, p: len(words(answer)) >= p["count"]),
    ConstraintKind(
        "end_with", ("phrase",), lambda rng: {"phrase": rng.choice(END_PHRASES)},
        lambda p: f'Finish your answer with the exact phrase "{p["phrase"]}" and write nothing after it.',
        lambda answer, p: answer.rstrip().endswith(p["phrase"])),
    ConstraintKind(
        "start_with", ("word",), lambda rng: {"word": rng.choice(START_WORDS)},
        lambda p: f'Make "{p["word"]}" the first word of your answer.',
        lambda answer, p: first_word(answer) == p["word"].lower()),
    ConstraintKind(
        "json_output", (), no_params,
        lambda p: "Give your whole answer as valid JSON.",
        lambda answer, p: parses_as_json(answer)),
    ConstraintKind(
        "bullet_count", ("count",), lambda rng: {"count": rng.randint(2, 4)},
        lambda p: (f"Answer with exactly {NUMBER_WORDS.get(p['count'], p['count'])} bullet points, each on its own "
                   'line starting with "- ".'),
        lambda answer, p: len(BULLET_LINE.findall(answer)) == p["count"]),
    ConstraintKind(
        "quoted", (), no_params,
        lambda p: "Put your whole answer inside double quotation marks.",
        lambda answer, p: is_quoted(answer)),
]
KINDS = {kind.name: kind for kind in KIND_LIST}

# Kinds that no answer can follow together (or only in a contorted way): never in the same prompt.
CONFLICTING_KINDS = {frozenset(pair) for pair in [
    ("lowercase", "uppercase"),
    ("min_words", "max_words"),
    ("json_output", "bullet_count"), ("json_output", "sentence_count"), ("json_output", "end_with"),
    ("json_output", "start_with"), ("json_output", "quoted"),
    ("end_with", "lowercase"), ("end_with", "uppercase"),  # the phrase is exact, capitals and all
    ("end_with", "quoted"),  # a quoted answer ends with the quote, not the phrase
    ("bullet_count", "quoted"),  # the opening quote would spoil the first bullet
    ("bullet_count", "start_with"),  # the first word of a bullet list is its marker
    ("bullet_count", "sentence_count"),  # bullets are rarely sentences under the simple splitter
]}


def required_words(constraint: dict) -> set[str]:
    """The words (lowercased) an answer must contain to follow the constraint."""
    if constraint["kind"] in ("include_keyword", "start_with"):
        return {constraint["word"].lower()}
    if constraint["kind"] == "end_with":
        return {word.lower() for word in words(constraint["phrase"])}
    return set()


def conflicting(first: dict, second: dict) -> bool:
    """Whether two constraints cannot be followed together: conflicting kinds, the same kind twice, or a word one
    of them forbids that the other requires (include "happy" and avoid "happy")."""
    if first["kind"] == second["kind"] or frozenset((first["kind"], second["kind"])) in CONFLICTING_KINDS:
        return True
    for forbidding, other in ((first, second), (second, first)):
        if forbidding["kind"] == "exclude_word" and forbidding["word"].lower() in required_words(other):
            return True
    return False


def instruction_text(constraint: dict) -> str:
    return KINDS[constraint["kind"]].render(constraint)


def follows(answer: str, constraint: dict) -> bool:
    return KINDS[constraint["kind"]].check(answer, constraint)


# ---------------------------------------------------------------- topics, tasks and the two splits

TOPICS = [
    "the ocean", "bicycles", "tea", "a rainy day", "dogs", "the moon", "bread", "a city park", "winter", "music",
    "trees", "coffee", "the library", "cats", "a birthday party", "trains", "the desert", "apples", "snow",
    "a morning walk", "mountains", "books", "the garden", "rivers", "soup", "the beach", "butterflies", "the sun",
    "a market", "friendship", "clouds", "pizza", "the forest", "homework", "a summer evening", "bees", "a bridge",
    "the kitchen", "rain boots", "a small village", "candles", "the night sky", "horses", "a picnic", "the wind",
    "chocolate", "a lighthouse", "paper airplanes",
]
# Every fourth topic is held out: a fixed quarter, so a train prompt never shares a held-out prompt's topic.
HELDOUT_TOPICS = TOPICS[3::4]
TRAIN_TOPICS = [topic for topic in TOPICS if topic not in HELDOUT_TOPICS]

# Tasks that fix no length or format of their own, so that any constraint can follow them.
TASKS = [
    "Write a short note about {topic}.",
    "Describe {topic} briefly.",
    "Tell me about {topic}.",
    "Give a short answer: why do people like {topic}?",
    "Say something nice about {topic}.",
    "Explain {topic} to a child.",
    "Share a fact about {topic}.",
]

# The pairs of kinds that may share a prompt, and the quarter of them that only held-out prompts use. The pairs are
# ordered by a hash of their names, which does not depend on the seed, the Python process or the order of KIND_LIST.
ALLOWED_PAIRS = sorted(pair for pair in itertools.combinations(sorted(KINDS), 2)
                       if frozenset(pair) not in CONFLICTING_KINDS)
HELDOUT_PAIRS = sorted(sorted(ALLOWED_PAIRS, key=lambda pair: hashlib.sha256("+".join(pair).encode()).hexdigest())
                       [:len(ALLOWED_PAIRS) // 4])
TRAIN_PAIRS = [pair for pair in ALLOWED_PAIRS if pair not in HELDOUT_PAIRS]
SINGLE_CONSTRAINT_SHARE = 0.4  # the rest of the prompts have two constraints
SPLITS = {"train": (TRAIN_TOPICS, TRAIN_PAIRS), "heldout": (HELDOUT_TOPICS, HELDOUT_PAIRS)}


def combination(constraints: list[dict]) -> tuple[str, ...]:
    """The sorted kind names of a prompt's constraints: what the held-out pairs are defined over."""
    return tuple(sorted(constraint["kind"] for constraint in constraints))


def draw_constraint(rng: random.Random, kind: str) -> dict:
    return {"kind": kind, **KINDS[kind].draw(rng)}


def draw_constraints(rng: random.Random, pairs: list[tuple[str, str]]) -> list[dict]:
    if rng.random() < SINGLE_CONSTRAINT_SHARE:
        return [draw_constraint(rng, rng.choice(sorted(KINDS)))]
    kinds = list(rng.choice(pairs))
    rng.shuffle(kinds)  # the order they are said in the prompt
    while True:  # kinds of an allowed pair always combine; only their words may clash (include and avoid "happy")
        constraints = [draw_constraint(rng, kind) for kind in kinds]
        if not conflicting(*constraints):
            return constraints


def reference_json(constraints: list[dict]) -> str:
    return json.dumps(constraints, sort_keys=True, separators=(",", ":"))


def make_prompts(count: int, seed: int, split: str) -> list[dict]:
    """`count` prompts of the split ("train" or "heldout"), the same for the same (count, seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    topics, pairs = SPLITS[split]
    # A string seed is hashed with SHA-512 by random.Random, so it is the same in every process.
    rng = random.Random(f"verifiable:{split}:{seed}")
    records = []
    for index in range(count):
        topic = rng.choice(topics)
        constraints = draw_constraints(rng, pairs)
        task = rng.choice(TASKS).format(topic=topic)
        text = " ".join([task] + [instruction_text(constraint) for constraint in constraints])
        records.append({"prompt_id": f"{split}-{index:04d}", "prompt": text, "topic": topic,
                        "constraints": constraints, "reference": reference_json(constraints)})
    return records


# ---------------------------------------------------------------- the rule functions


def parse_constraints(reference: Optional[str]) -> list[dict]:
    """The constraints a reference holds; ValueError naming what is wrong with one that is not a JSON list of
    {"kind": a known kind, its parameters}."""
    if reference is None:
        raise ValueError("the reference is missing (None): a verifiable prompt's reference is the JSON list of its "
                         "constraints")
    if not isinstance(reference, str):
        raise ValueError(f"the reference is a {type(reference).__name__}, expected a JSON string of constraints")
    try:
        constraints = json.loads(reference)
    except ValueError as err:
        raise ValueError(f"the reference is not valid JSON ({err}): {reference[:80]!r}") from None
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"the reference must be a non-empty JSON list of constraints, got {reference[:80]!r}")
    for number, constraint in enumerate(constraints, start=1):
        if not isinstance(constraint, dict) or "kind" not in constraint:
            raise ValueError(f"constraint {number} of the reference is not an object with a \"kind\": "
                             f"{json.dumps(constraint)[:80]}")
        kind = constraint["kind"]
        if kind not in KINDS:
            raise ValueError(f"constraint {number} of the reference has an unknown kind {kind!r}; known kinds: "
                             f"{', '.join(sorted(KINDS))}")
        missing = [name for name in KINDS[kind].params if name not in constraint]
        if missing:
            raise ValueError(f"constraint {number} of the reference ({kind}) lacks parameter(s) {', '.join(missing)}")
    return constraints


def instruction_score(prompt: str, answer: str, reference: Optional[str]) -> float:
    """The fraction of the prompt's constraints the answer follows (IFEval's instruction-level accuracy for one
    prompt): what ranks sampled answers. The prompt text is not needed; the reference says it all."""
    constraints = parse_constraints(reference)
    if not answer or not answer.strip():
        return 0.0
    return sum(follows(answer, constraint) for constraint in constraints) / len(constraints)


def prompt_followed(prompt: str, answer: str, reference: Optional[str]) -> float:
    """1.0 when the answer follows every constraint, else 0.0 (IFEval's prompt-level strict accuracy): what the
    evaluation's constraint-following rate averages."""
    return 1.0 if instruction_score(prompt, answer, reference) == 1.0 else 0.0


# ---------------------------------------------------------------- the files


def write_verifiable_data(out_dir: str, train_prompts: int, heldout_prompts: int, seed: int = 0) -> dict[str, Path]:
    """Writes under out_dir prompts.jsonl (train prompts), heldout.jsonl (held-out prompts) and questions.jsonl (the
    held-out prompts as MT-Bench-format questions of category `ifeval`, their constraints as the reference, for the
    evaluation with a rule judge)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_prompts(train_prompts, seed, "train")
    heldout = make_prompts(heldout_prompts, seed, "heldout")
    questions = [{"question_id": number, "category": "ifeval", "turns": [record["prompt"]],
                  "reference": [record["reference"]]} for number, record in enumerate(heldout, start=1)]
    paths = {name: out / f"{name}.jsonl" for name in ("prompts", "heldout", "questions")}
    for name, rows in (("prompts", train), ("heldout", heldout), ("questions", questions)):
        rewrite_records(paths[name], rows)
    return paths
