"""The credit-assignment task in natural language, for a real pretrained model (jobs/reproduce-smollm2.yaml).

Every animal K has a secret colour f(K), a bijection drawn per seed. The prompt lists the allowed colours and
asks for a short sentence, then the animal's colour; the answer is a filler sentence, then `The K's colour is X.`
The rejected answer has another filler sentence and a wrong colour, so about ten tokens differ per side and
only X matters. Held-out answers use filler sentences never trained on.

Same interface as task.Task, so the data, the oracle rewards and the probe of task.py serve both tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Each one token after a space in SmolLM2's tokenizer (check_task_tokens checks it for the model at hand).
ANIMALS = "cat dog fox owl bee cow pig hen".split()
COLOURS = "red blue green gold pink white brown gray".split()
SUBJECTS = ["The river", "My brother", "A small boat", "The old teacher", "Our neighbour", "The train",
            "A young girl", "The farmer", "My aunt", "The wind", "A tall man", "The baker"]
PREDICATES = ["was calm this morning.", "walked home after the game.", "stopped near the bridge.",
              "looked tired on Sunday.", "moved slowly past the market.", "arrived late last night.",
              "waited by the window.", "sang a quiet song.", "turned back at the gate.", "felt cold in the rain.",
              "came early to the meeting.", "rested under a tree."]
HELD_OUT_EVERY = 4  # one filler sentence in four is kept for the probe


def filler_sentences(held_out: bool) -> tuple[str, ...]:
    """The 144 subject-predicate sentences, split into training (108) and held-out (36) ones."""
    return tuple(f"{subject} {predicate}" for i, subject in enumerate(SUBJECTS)
                 for j, predicate in enumerate(PREDICATES) if ((i + j) % HELD_OUT_EVERY == 0) == held_out)


@dataclass(frozen=True)
class ColourTask:
    keys: tuple[str, ...]  # animals
    values: tuple[str, ...]  # colours, listed in the prompt in this fixed order
    mapping: dict  # f: animal -> colour
    marker = " is"
    slot_line_tokens = 5  # " The", " K", "'s", " colour", " is"

    def prompt(self, key: str) -> str:
        return (f"Each animal has a secret colour: one of {', '.join(self.values)}. Write a short sentence, then "
                f"say the {key}'s colour.")

    def slot_prefix(self, key: str) -> str:
        return f" The {key}'s colour is"

    def answer(self, rng: random.Random, key: str, value: str, held_out: bool = False) -> str:
        return f"{rng.choice(filler_sentences(held_out))}{self.slot_prefix(key)} {value}."


def make_colour_task(seed: int, keys: int = 4) -> ColourTask:
    """The task of one seed: the first `keys` animals and colours, and a bijection between them drawn from the
    seed."""
    if not 2 <= keys <= len(ANIMALS):
        raise ValueError(f"keys must be between 2 and {len(ANIMALS)} for the colours task, got {keys}")
    colours = list(COLOURS[:keys])
    random.Random(seed).shuffle(colours)
    return ColourTask(keys=tuple(ANIMALS[:keys]), values=tuple(COLOURS[:keys]),
                      mapping=dict(zip(ANIMALS[:keys], colours)))
