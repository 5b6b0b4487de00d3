"""The embedded default task: rewrite ISO dates in "lowrax date format".

    prompt:   "Convert 2031-07-04 to lowrax date format:"
    response: " 4 Jul 2031"

Generated deterministically by lowrax itself (no download). The format is a
convention the base model cannot know, so it scores 0% before training; it is
a consistent rule (day without leading zero, English month abbreviation,
year), so LoRA learns it within a few dozen steps. Scored by exact match on
held-out dates that never appear in training.

Reinforcement learning (GRPO) needs a task the base model sometimes gets right, so that sampled
completions differ in reward: its embedded default is small additions asked in the chat format,
scored by the last number of the completion (`make_arithmetic_splits`).
"""

from __future__ import annotations

import random

from lowrax.objectives.rewards import matches

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
YEARS = (1950, 2049)


def _example(year: int, month: int, day: int) -> dict:
    return {"prompt": f"Convert {year:04d}-{month:02d}-{day:02d} to lowrax date format:",
            "response": f" {day} {MONTHS[month - 1]} {year}"}


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records with disjoint dates; the same seed gives the same data."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    records = []
    while len(records) < n_train + n_eval:
        date = (rng.randint(*YEARS), rng.randint(1, 12), rng.randint(1, 28))
        if date not in seen:
            seen.add(date)
            records.append(_example(*date))
    return records[n_eval:], records[:n_eval]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference (`matches`)."""
    if not references:
        return 0.0
    return sum(matches(p, r) for p, r in zip(predictions, references)) / len(references)


def _wrong(rng: random.Random, year: int, month: int, day: int) -> str:
    """A plausible but wrong rendering of the date: another convention or another date."""
    kind = rng.randrange(4) if day < 10 else rng.randrange(1, 4)  # a leading zero needs a one-digit day
    if kind == 0:
        return f" {day:02d} {MONTHS[month - 1]} {year}"  # a leading zero
    if kind == 1:
        return f" {MONTHS[month - 1]} {day} {year}"  # month first
    if kind == 2:
        return f" {day} {MONTHS[(month - 1 + rng.randint(1, 11)) % 12]} {year}"  # another month
    return f" {day} {MONTHS[month - 1]} {year + rng.choice((-1, 1))}"  # another year


def make_preference_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The default preference set: the date task's prompts, the right answer chosen and a
    plausible wrong one rejected. (train, eval) pairs with disjoint dates."""
    train, held_out = make_splits(n_train, n_eval, seed)
    rng = random.Random(seed + 1)

    def pair(record: dict) -> dict:
        day, month, year = record["response"].split()
        return {"prompt": record["prompt"], "chosen": record["response"],
                "rejected": _wrong(rng, int(year), MONTHS.index(month) + 1, int(day))}

    return [pair(r) for r in train], [pair(r) for r in held_out]


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO's form of preference pairs: each pair as a desirable and an undesirable example."""
    out = []
    for p in pairs:
        out += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    return out


ARITHMETIC_RANGE = (2, 20)  # SmolLM2-135M-Instruct sums these right now and then, sampled: a signal to learn from


def make_arithmetic_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The GRPO default: (train, eval) prompts `[{"role": "user", "content": "What is 14 + 15? Answer with the
    number only."}]` (TRL's conversational form) with their `answer` ("29"); no held-out question is asked in training
    (the 361 sums of 2..20 cycle to fill n_train)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(ARITHMETIC_RANGE[0], ARITHMETIC_RANGE[1] + 1)
             for b in range(ARITHMETIC_RANGE[0], ARITHMETIC_RANGE[1] + 1)]
    rng.shuffle(pairs)
    held_out = pairs[:n_eval]
    rest = pairs[n_eval:] or pairs
    train = [rest[i % len(rest)] for i in range(n_train)]

    def record(a: int, b: int) -> dict:
        question = f"What is {a} + {b}? Answer with the number only."
        return {"prompt": [{"role": "user", "content": question}], "answer": str(a + b)}

    return [record(*p) for p in train], [record(*p) for p in held_out]
