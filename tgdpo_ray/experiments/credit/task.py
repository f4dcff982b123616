"""The credit-assignment task of `tgdpo-ray reproduce`: one decisive token among many irrelevant differences.

A prompt `key: K` names a key K from a set A of words. The answer is FILLER_LENGTH filler words, then `K => X`
with X = f(K) for a bijection f over A drawn from the seed. The chosen answer has the right X; the rejected one
has a wrong X' and a filler drawn again, so about 17 tokens differ per side but only X matters. A sequence-level
loss (DPO) must find out which differences count; token-level guidance can say so.

Also here: the warm-start data (the format with X drawn uniformly, so a model trained on it has learned the
filler and is near uniform over A at the slot), the oracle token rewards (+c on X, -c on X') and their shuffled
control, the tiny model with a tokenizer that keeps every word of the task one token, and `slot_probe`, the
teacher-forced metrics the trainer records every few steps (training.probe).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tgdpo_ray.common.jsonl import numbered_lines, rewrite_records
from tgdpo_ray.config.job import DataSection
from tgdpo_ray.data.preference import template_pair, tokenize_pair

SLOT_WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo jasper kestrel lotus maple nectar onyx prism "
    "quartz raven sable tundra umber velvet willow yarrow"
).split()
FILLER_WORDS = (
    "the a of and to in is it that was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can"
).split()
FILLER_LENGTH = 16
ARROW = "=>"


@dataclass(frozen=True)
class Task:
    """The tiny task. Every task (also colours.ColourTask) has keys, values, a bijection `mapping` from keys to
    values, prompt(key), answer(rng, key, value, held_out), slot_prefix(key): the text just before the value, whose
    last token is `marker`, and slot_line_tokens: how many tokens that prefix has (the filler ends before them)."""

    keys: tuple[str, ...]  # the set A
    mapping: dict  # f: key -> value, a bijection over A
    filler: tuple[str, ...]
    marker = f" {ARROW}"
    slot_line_tokens = 2  # " K", " =>"

    @property
    def values(self) -> tuple[str, ...]:
        return self.keys

    def prompt(self, key: str) -> str:
        return f"key: {key}"

    def slot_prefix(self, key: str) -> str:
        return f" {key} {ARROW}"

    def answer(self, rng: random.Random, key: str, value: str, held_out: bool = False) -> str:
        """16 filler words, then `K => X`; a held-out answer draws new word sequences from the same words."""
        return " ".join(rng.choices(self.filler, k=FILLER_LENGTH) + [f"{key} {ARROW} {value}"])


def make_task(seed: int, keys: int = 16, filler_words: int = 24) -> Task:
    """The task of one seed: its bijection f is drawn from the seed (the key set and filler are fixed)."""
    if not 2 <= keys <= len(SLOT_WORDS):
        raise ValueError(f"keys must be between 2 and {len(SLOT_WORDS)}, got {keys}")
    if not 2 <= filler_words <= len(FILLER_WORDS):
        raise ValueError(f"filler_words must be between 2 and {len(FILLER_WORDS)}, got {filler_words}")
    chosen = tuple(SLOT_WORDS[:keys])
    values = list(chosen)
    random.Random(seed).shuffle(values)
    return Task(keys=chosen, mapping=dict(zip(chosen, values)), filler=tuple(FILLER_WORDS[:filler_words]))


def preference_pair(task, rng: random.Random, key: str) -> dict:
    value = task.mapping[key]
    wrong = rng.choice([other for other in task.values if other != value])
    return {"prompt": task.prompt(key), "chosen": task.answer(rng, key, value),
            "rejected": task.answer(rng, key, wrong), "key": key, "value": value, "wrong_value": wrong}


def warm_start_pair(task: Task, rng: random.Random, key: str) -> dict:
    """The format alone: X is drawn uniformly (f is never shown), so the start knows the filler and the slot's
    place, and is near uniform over A there."""
    first, second = rng.sample(task.keys, 2)
    return {"prompt": task.prompt(key), "chosen": task.answer(rng, key, first),
            "rejected": task.answer(rng, key, second)}


def check_task_tokens(task, tokenizer) -> None:
    """Every key and value is one token after a space, and every slot prefix is slot_line_tokens tokens ending in
    the marker: the probe and the oracle rewards find the slot by these ids."""
    for word in task.keys + task.values:
        pieces = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"the tokenizer splits {word!r} into {len(pieces)} tokens; the task needs one")
    marker = marker_id(tokenizer, task.marker)
    for key in task.keys:
        pieces = tokenizer(task.slot_prefix(key), add_special_tokens=False)["input_ids"]
        if len(pieces) != task.slot_line_tokens or pieces[-1] != marker:
            raise ValueError(f"the slot prefix {task.slot_prefix(key)!r} is {len(pieces)} tokens ending in "
                             f"{pieces[-1]}; the task needs {task.slot_line_tokens} ending in {task.marker!r}")


# ---------------------------------------------------------------- token rewards


def marker_id(tokenizer, marker: str) -> int:
    pieces = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(pieces) != 1:
        raise ValueError(f"the tokenizer splits {marker!r} into {len(pieces)} tokens; the task needs one")
    return pieces[0]


def slot_index(answer_ids: list[int], marker: int) -> int:
    """The place of X among an answer's tokens: the token after the last marker (e.g. `=>`)."""
    return len(answer_ids) - answer_ids[::-1].index(marker)


def oracle_rewards(pair: dict, tokenizer, data: DataSection, reward: float, rng: random.Random,
                   marker: str = f" {ARROW}") -> dict:
    """Per answer token, in exactly the tokenization the trainer uses (data.tokenize_pair): +reward on X,
    -reward on X', 0 elsewhere; and the control, each answer's rewards shuffled across its positions."""
    tokens, _ = tokenize_pair(tokenizer, pair, data)
    columns = {}
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        ids = tokens[f"{side}_ids"]
        values = [0.0] * len(ids)
        values[slot_index(ids, marker_id(tokenizer, marker))] = sign * reward
        shuffled = list(values)
        rng.shuffle(shuffled)
        columns[f"oracle_{side}"], columns[f"shuffled_{side}"] = values, shuffled
    return columns


# ---------------------------------------------------------------- files


def task_keys(task: Task, count: int, rng: random.Random) -> list[str]:
    """`count` keys, every key equally often (up to one), in random order."""
    keys = [task.keys[index % len(task.keys)] for index in range(count)]
    rng.shuffle(keys)
    return keys


def write_task_data(out_dir: Path, task, seed: int, train_pairs: int, probe_answers_per_key: int,
                    tokenizer, data: DataSection, reward: float) -> dict[str, Path]:
    """train.jsonl (pairs with oracle and shuffled token rewards) and probe.jsonl (held-out chosen answers: every
    key, fillers never trained on) under out_dir."""
    check_task_tokens(task, tokenizer)
    rng = random.Random(seed)
    train = []
    for key in task_keys(task, train_pairs, rng):
        pair = preference_pair(task, rng, key)
        train.append(pair | oracle_rewards(pair, tokenizer, data, reward, rng, task.marker))
    probe = [{"prompt": task.prompt(key), "answer": task.answer(rng, key, task.mapping[key], held_out=True),
              "key": key, "value": task.mapping[key]} for key in task.keys for _ in range(probe_answers_per_key)]
    paths = {"train": out_dir / "train.jsonl", "probe": out_dir / "probe.jsonl"}
    out_dir.mkdir(parents=True, exist_ok=True)
    rewrite_records(paths["train"], train)
    rewrite_records(paths["probe"], probe)
    return paths


def write_warm_start_data(path: Path, task: Task, seed: int, pairs: int) -> Path:
    rng = random.Random(seed)
    rewrite_records(path, [warm_start_pair(task, rng, key) for key in task_keys(task, pairs, rng)])
    return path


def tokenizer_corpus(task: Task, seed: int, lines: int = 2000) -> list[str]:
    """Text in the task's shape, so that byte-level BPE merges every word of it into one token."""
    rng = random.Random(seed)
    corpus = []
    for key in task_keys(task, lines, rng):
        pair = warm_start_pair(task, rng, key)
        corpus += [pair["prompt"], pair["chosen"]]
    return corpus


def make_task_model(out_dir: Path, task: Task, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Path:
    """The tiny random Llama of the demo, with a tokenizer trained on the task's text; checks that every key, filler
    word and the arrow is one token after a space (as the slot line's tokens are, which the probe and the oracle
    rewards find by their ids)."""
    from tgdpo_ray.modeling.loading import load_tokenizer
    from tgdpo_ray.modeling.tiny import make_tiny_model

    make_tiny_model(str(out_dir), tokenizer_corpus(task, seed), seed=seed, hidden_size=hidden_size, layers=layers)
    tokenizer = load_tokenizer(str(out_dir))
    check_task_tokens(task, tokenizer)
    for word in task.filler:
        pieces = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"the task tokenizer splits {word!r} into {len(pieces)} tokens")
    return out_dir


# ---------------------------------------------------------------- the probe


PROBE_FIELDS = ("prompt", "answer", "key", "value")


@dataclass
class ProbeSet:
    input_ids: torch.Tensor  # [n, L], right-padded
    attention_mask: torch.Tensor  # [n, L]
    slot_positions: torch.Tensor  # [n]: the position whose logits predict X
    values: torch.Tensor  # [n]: the token id of X
    filler_mask: torch.Tensor  # [n, L]: True where the logits predict a filler token
    slot_ids: torch.Tensor  # [|values|]: the token ids of the allowed values at the slot


def encode_probe_set(path: str, tokenizer, marker: str = f" {ARROW}", slot_line_tokens: int = 2) -> ProbeSet:
    """Each held-out answer in the trainer's tokenization (chat template, answer tokens after the prompt); the
    slot is the token after the answer's last `marker`, and the filler ends `slot_line_tokens` before it."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    marker = marker_id(tokenizer, marker)
    sequences, slots, values, fillers, allowed = [], [], [], [], set()
    for number, record in numbered_lines(path):
        missing = [key for key in PROBE_FIELDS if key not in record] if isinstance(record, dict) else None
        if missing is None or missing:
            raise ValueError(f"{path}, line {number}: " + (f"no {missing}" if missing else str(record)))
        prompt_text, (answer_text,) = template_pair(
            tokenizer, [{"role": "user", "content": record["prompt"]}],
            [[{"role": "assistant", "content": record["answer"]}]])
        prompt_ids, answer_ids = encode(prompt_text), encode(answer_text)
        slot = slot_index(answer_ids, marker)
        sequences.append(prompt_ids + answer_ids)
        slots.append(len(prompt_ids) + slot - 1)
        values.append(answer_ids[slot])
        # The filler is every answer token before the slot line (e.g. `K =>`).
        fillers.append(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + slot - slot_line_tokens))
        allowed.add(record["value"])
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    filler_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        filler_mask[row, list(fillers[row])] = True
    slot_ids = [encode(f" {value}")[0] for value in sorted(allowed)]
    return ProbeSet(input_ids, attention_mask, torch.tensor(slots), torch.tensor(values), filler_mask,
                    torch.tensor(slot_ids))


@functools.lru_cache(maxsize=4)
def probe_inputs(path: str, reference: str, device: str, marker: str, slot_line_tokens: int):
    """The probe set and the reference's log-probs on it, computed once per process (the reference is frozen)."""
    from tgdpo_ray.modeling.loading import load_causal_lm, load_tokenizer

    probe_set = encode_probe_set(path, load_tokenizer(reference), marker, slot_line_tokens)
    model = load_causal_lm(reference, "fp32").to(device).eval()
    with torch.no_grad():
        reference_logps = sequence_logps(model, probe_set, device)
    return probe_set, reference_logps


def sequence_logps(model, probe_set: ProbeSet, device) -> torch.Tensor:
    logits = model(input_ids=probe_set.input_ids.to(device),
                   attention_mask=probe_set.attention_mask.to(device)).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def slot_probe(model, tokenizer, device, examples: str, reference: str, marker: str = f" {ARROW}",
               slot_line_tokens: int = 2) -> dict[str, float]:
    """Teacher-forced on held-out chosen answers, means over the answers: at the slot, the probability of f(K), the
    argmax accuracy over the allowed values, the slot margin log P(f(K)) - log sum_{v != f(K)} P(v) over the
    other allowed values, and the probability mass on all allowed values; and the policy's KL from the reference
    on the filler positions (mean per position).
    The trainer's probe (training.probe): `examples` is a probe.jsonl, `reference` the policy's start."""
    probe_set, reference_logps = probe_inputs(examples, reference, str(device), marker, slot_line_tokens)
    logps = sequence_logps(model, probe_set, device)
    rows = torch.arange(len(probe_set.values))
    at_slot = logps[rows, probe_set.slot_positions.to(device)]  # [n, V]
    values, slot_ids = probe_set.values.to(device), probe_set.slot_ids.to(device)
    allowed = at_slot[:, slot_ids]  # [n, |values|]
    predicted = slot_ids[allowed.argmax(dim=-1)]
    right = at_slot.gather(1, values[:, None])[:, 0]
    wrong = allowed.masked_fill(slot_ids[None, :] == values[:, None], float("-inf")).logsumexp(dim=-1)
    mask = probe_set.filler_mask.to(device)
    kl = (logps.exp() * (logps - reference_logps)).sum(dim=-1)  # [n, L]
    return {"slot_probability": float(right.exp().mean()),
            "slot_accuracy": float((predicted == values).float().mean()),
            "slot_margin": float((right - wrong).mean()),
            "allowed_mass": float(allowed.exp().sum(dim=-1).mean()),
            "filler_kl": float(kl[mask].mean())}
