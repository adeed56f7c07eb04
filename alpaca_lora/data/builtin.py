"""Instruction sets this project generates itself, deterministically, in the Alpaca format.

``skills`` holds short tasks whose answers can be checked exactly (arithmetic, word order, unit
conversion, field extraction, ...), so a fine-tune on it gives a measurable before/after result
offline. It is our own data and ships as code.
"""

from __future__ import annotations

import random
from typing import Callable

WORDS = (
    "apple river stone cloud garden window silver orange candle forest music paper rocket "
    "yellow bridge castle dragon pencil mirror summer winter planet ocean island butter "
    "guitar lemon marble needle pocket rabbit shadow tiger violet wagon zebra anchor basket "
    "copper desert engine falcon harbor jacket kettle ladder meadow napkin orchid parrot "
    "quartz saddle tunnel velvet walnut"
).split()
NAMES = "alice bruno chen dana emil farah gita hugo ines jonas kofi lena maya nils omar".split()
DOMAINS = ("example.com", "mail.org", "post.net", "inbox.io")
EVENTS = (
    "The bridge opened in {year} after a long delay.",
    "Our school was founded in {year} by three teachers.",
    "The band released its first album in {year}.",
    "In {year} the city built a new harbor.",
    "She moved to the coast in {year} and never left.",
)


def _words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", "", str(a + b)


def _subtract(rng):
    a, b = rng.randint(50, 99), rng.randint(1, 49)
    return "Subtract the second number from the first.", f"{a}, {b}", str(a - b)


def _reverse(rng):
    words = _words(rng)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sort(rng):
    words = _words(rng)
    return "Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))


def _uppercase(rng):
    words = _words(rng, 2, 4)
    return "Rewrite the text in capital letters.", " ".join(words), " ".join(words).upper()


def _kilometers(rng):
    km = rng.randint(2, 999)
    return f"Convert {km} kilometers to meters.", "", f"{km * 1000} meters"


def _minutes(rng):
    hours, minutes = rng.randint(1, 9), rng.randint(1, 59)
    return f"How many minutes are there in {hours} hours and {minutes} minutes?", "", str(hours * 60 + minutes)


def _email(rng):
    name, other = rng.sample(NAMES, 2)
    email = f"{name}.{rng.choice(WORDS)}@{rng.choice(DOMAINS)}"
    text = f"Please ask {other.title()} or write to {email} before {rng.choice(['Monday', 'Friday', 'noon'])}."
    return "Extract the email address from the text.", text, email


def _year(rng):
    year = rng.randint(1900, 2020)
    return "Which year is mentioned in the sentence?", rng.choice(EVENTS).format(year=year), str(year)


def _last_word(rng):
    words = _words(rng, 4, 6)
    return "What is the last word of the list?", " ".join(words), words[-1]


def _count(rng):
    words = _words(rng, 2, 7)
    return "How many words are in the input?", " ".join(words), str(len(words))


SKILLS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _add, _subtract, _reverse, _sort, _uppercase, _kilometers, _minutes, _email, _year, _last_word, _count,
)


def skills(size: int = 3000, seed: int = 0) -> list[dict[str, str]]:
    """``size`` distinct checkable tasks, cycling through every skill, identical on every machine."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < size:
        instruction, input_text, output = SKILLS[len(records) % len(SKILLS)](rng)
        if (instruction, input_text) not in seen:
            seen.add((instruction, input_text))
            records.append({"instruction": instruction, "input": input_text, "output": output})
    return records


BUILTIN_DATASETS: dict[str, Callable[[], list[dict[str, str]]]] = {"skills": skills}


def builtin_dataset(name: str) -> list[dict[str, str]]:
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"unknown built-in dataset '{name}'; available: {sorted(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name]()
