"""Reward functions for GRPO, with TRL's contract: `fn(prompts, completions, **columns) -> list[float | None]`.

`prompts` and `completions` are lists of strings (or, for chat data, lists of messages); every other
column of the prompt records arrives as a keyword argument holding one value per completion, so a
reward can read the record's `answer`. None means "this function does not score this completion".

Built-ins, named in a config as `exact_match`, `final_number`, `regex_match`, `format_match` and
`length_penalty`; any other function is named `module:function` and imported. In a config a built-in's
option follows an `=` (`format_match=\\d+`, `length_penalty=200`, `exact_match=solution`):
`reward_from_spec`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from typing import Callable, Sequence

import numpy as np

from lowrax.errors import LowraxError

RewardFunction = Callable[..., list]


def completion_text(completion) -> str:
    """A completion as text: the string itself, or a chat completion's last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise LowraxError(f"a completion must be text or a list of chat messages; got {type(completion).__name__}")


def matches(prediction: str, reference: str) -> bool:
    """Whether a prediction is its reference, surrounding whitespace ignored: what exact match counts (the
    reward here and the task metric of `lowrax train`)."""
    return prediction.strip() == reference.strip()


def _answers(columns: dict, answer_field: str, reward: str) -> list:
    """The answer column a reward compares with, or an error naming the columns there are."""
    answers = columns.get(answer_field)
    if answers is None:
        raise LowraxError(f"the {reward} reward reads the column {answer_field!r}, which the prompt records lack "
                          f"(columns: {', '.join(sorted(columns)) or 'none'})")
    return answers


def exact_match(answer_field: str = "answer") -> RewardFunction:
    """1.0 where the completion is the record's `answer_field` (`matches`: whitespace around either ignored, as
    the exact-match metric counts), else 0.0; None where the record has no answer."""
    def reward(prompts, completions, **columns):
        return [None if answer is None else float(matches(completion_text(c), str(answer)))
                for c, answer in zip(completions, _answers(columns, answer_field, "exact_match"))]
    reward.__name__ = "exact_match"
    return reward


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    """The value of a number written with optional thousands commas and decimals, or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(answer_field: str = "answer") -> RewardFunction:
    """1.0 where the last number in the completion equals the record's `answer_field` as a number (thousands
    commas ignored: "1,024" is 1024), else 0.0; None where the record has no answer. The usual verifiable
    reward of arithmetic and grade-school maths sets, where a completion may reason before its answer."""
    def reward(prompts, completions, **columns):
        out = []
        for c, answer in zip(completions, _answers(columns, answer_field, "final_number")):
            expected = None if answer is None else _number(str(answer).strip())
            found = _NUMBER.findall(completion_text(c))
            out.append(None if expected is None else float(bool(found) and _number(found[-1]) == expected))
        return out
    reward.__name__ = "final_number"
    return reward


def _pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise LowraxError(f"reward pattern {pattern!r} is not a valid regular expression: {e}") from None


def regex_match(pattern: str) -> RewardFunction:
    """1.0 where the pattern occurs anywhere in the completion (`.` matches newlines), else 0.0."""
    compiled = _pattern(pattern)

    def reward(prompts, completions, **columns):
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]
    reward.__name__ = "regex_match"
    return reward


def format_match(pattern: str) -> RewardFunction:
    """1.0 where the whole completion matches the pattern (`.` matches newlines), else 0.0: a format
    reward such as `<think>.*?</think>\\s*<answer>.*?</answer>`."""
    compiled = _pattern(pattern)

    def reward(prompts, completions, **columns):
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]
    reward.__name__ = "format_match"
    return reward


def length_penalty(max_chars: int) -> RewardFunction:
    """0.0 for a completion of at most `max_chars` characters, else -(length - max_chars) / max_chars."""
    if max_chars < 1:
        raise LowraxError(f"length_penalty needs max_chars >= 1, got {max_chars}")

    def reward(prompts, completions, **columns):
        return [-max(0, len(completion_text(c)) - max_chars) / max_chars for c in completions]
    reward.__name__ = "length_penalty"
    return reward


BUILT_INS = {"exact_match": exact_match, "final_number": final_number, "regex_match": regex_match,
             "format_match": format_match, "length_penalty": length_penalty}
# The option a config gives a built-in after `=`, and how it is read.
SPEC_OPTIONS = {"exact_match": ("answer_field", str), "final_number": ("answer_field", str),
                "regex_match": ("pattern", str), "format_match": ("pattern", str), "length_penalty": ("max_chars", int)}


def reward_function(name: str, **options) -> RewardFunction:
    """A built-in by name (with its options), or `module:function` imported."""
    if name in BUILT_INS:
        try:
            return BUILT_INS[name](**options)
        except TypeError as e:
            raise LowraxError(f"reward {name!r}: {e}") from None
    if ":" not in name:
        raise LowraxError(f"unknown reward {name!r}; expected one of {', '.join(BUILT_INS)} or module:function")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LowraxError(f"reward {name!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise LowraxError(f"reward {name!r}: {module_name} has no function {attribute!r}")
    if options:
        raise LowraxError(f"reward {name!r} takes no options in the config; got {', '.join(sorted(options))}")
    return fn


def reward_from_spec(spec: str) -> RewardFunction:
    """A reward as a config names it: `NAME` or `NAME=OPTION` for a built-in (regex_match and format_match
    need their pattern), or `module:function`."""
    name, has_option, option = spec.partition("=")
    name = name.strip()
    if name not in BUILT_INS:
        if has_option:
            raise LowraxError(f"reward {spec!r}: only the built-ins ({', '.join(BUILT_INS)}) take an option after '='")
        return reward_function(name)
    key, kind = SPEC_OPTIONS[name]
    if not has_option:
        if inspect.signature(BUILT_INS[name]).parameters[key].default is inspect.Parameter.empty:
            raise LowraxError(f"reward {name!r} needs its {key}: write {name}={key.upper()} in the config")
        return reward_function(name)
    try:
        value = kind(option)
    except ValueError:
        raise LowraxError(f"reward {spec!r}: {name}'s option is {key}, an integer; got {option!r}") from None
    return reward_function(name, **{key: value})


def reward_name(fn: RewardFunction) -> str:
    """What metrics call a reward function: its __name__ (TRL's `rewards/NAME/mean`)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def score(functions: Sequence[RewardFunction], weights: Sequence[float] | None, prompts: list, completions: list,
          columns: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [N, F] with NaN where a function returned None, weighted sum [N]), the sum NaN where no
    function scored the completion: what `group_advantages` takes, as TRL combines rewards. Each function
    must return one float or None per completion."""
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise LowraxError(f"{len(weights)} reward weights for {len(functions)} reward functions")
    table = np.full((len(completions), len(functions)), np.nan, np.float32)
    for j, fn in enumerate(functions):
        values = fn(prompts=prompts, completions=completions, **columns)
        name = reward_name(fn)
        if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != len(completions):
            raise LowraxError(f"reward {name} must return a list of {len(completions)} values (float or None); "
                              f"got {type(values).__name__}" + (f" of {len(values)}" if hasattr(values, "__len__") else ""))
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):  # bools count as 0 / 1
                raise LowraxError(f"reward {name} returned {v!r} for completion {i}; expected a finite float or None")
            table[i, j] = float(v)
    combined = np.nansum(table * np.asarray(weights, np.float32), axis=1)
    combined[np.isnan(table).all(axis=1)] = np.nan
    return table, combined
