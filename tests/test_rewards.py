"""GRPO reward functions: the built-ins, user functions named module:function with TRL's contract, and their
weighted combination (NaN where no function scored a completion), with every bad return named."""

from __future__ import annotations

import numpy as np
import pytest

from lowrax.errors import LowraxError
from lowrax.objectives.rewards import completion_text, reward_from_spec, reward_function, score


def shouting(prompts, completions, **columns):
    """A user reward: 1 for an upper-case completion, None where the record says to skip it."""
    return [None if skip else float(completion_text(c).isupper()) for c, skip in zip(completions, columns["skip"])]


def test_exact_match_compares_stripped_text_with_the_answer_column():
    reward = reward_function("exact_match")
    got = reward(prompts=["a", "b", "c"], completions=[" 42\n", "41", "x"], answer=["42", 42, None])
    assert got == [1.0, 0.0, None]
    with pytest.raises(LowraxError, match="reads the column 'answer'.*columns: label"):
        reward(prompts=["a"], completions=["1"], label=[1])


def test_regex_format_and_length_rewards():
    completions = ["<think>a\nb</think> <answer>3</answer>", "the answer is 3", "x" * 30]
    assert reward_function("regex_match", pattern=r"answer.*3")(prompts=None, completions=completions) == [1.0, 1.0, 0.0]
    assert reward_function("format_match", pattern=r"<think>.*?</think>\s*<answer>.*?</answer>")(
        prompts=None, completions=completions) == [1.0, 0.0, 0.0]
    assert reward_function("length_penalty", max_chars=20)(prompts=None, completions=completions) == [
        -(len(completions[0]) - 20) / 20, 0.0, -0.5]


def test_chat_completions_are_scored_by_their_last_message():
    chat = [[{"role": "assistant", "content": "42"}]]
    assert reward_function("exact_match")(prompts=[[]], completions=chat, answer=["42"]) == [1.0]


def test_a_user_function_is_named_module_colon_function():
    reward = reward_function("tests.test_rewards:shouting")
    assert reward(prompts=["p"] * 3, completions=["YES", "no", "NO"], skip=[False, False, True]) == [1.0, 0.0, None]


@pytest.mark.parametrize("name, options, message", [
    ("accuracy", {}, "unknown reward 'accuracy'; expected one of exact_match"),
    ("no_such_module_xyz:f", {}, "cannot import 'no_such_module_xyz'"),
    ("tests.test_rewards:missing", {}, "has no function 'missing'"),
    ("tests.test_rewards:shouting", {"scale": 2}, "takes no options"),
    ("regex_match", {"pattern": "("}, "not a valid regular expression"),
    ("length_penalty", {"max_chars": 0}, "max_chars >= 1"),
    ("exact_match", {"field": "x"}, "reward 'exact_match'"),
])
def test_bad_reward_names_and_options_are_errors(name, options, message):
    with pytest.raises(LowraxError, match=message):
        reward_function(name, **options)


def test_rewards_combine_weighted_with_none_left_out_and_nan_where_nothing_scored():
    exact, shout = reward_function("exact_match"), reward_function("tests.test_rewards:shouting")
    completions = ["A", "b", "C", "d"]
    columns = {"answer": ["A", None, "x", None], "skip": [False, False, False, True]}
    table, combined = score([exact, shout], [2.0, 0.5], ["p"] * 4, completions, columns)
    np.testing.assert_array_equal(np.isnan(table), [[False, False], [True, False], [False, False], [True, True]])
    np.testing.assert_allclose(combined[:3], [2.0 * 1 + 0.5 * 1, 0.5 * 0, 2.0 * 0 + 0.5 * 1])
    assert np.isnan(combined[3])  # no function scored it: group_advantages gives it 0


@pytest.mark.parametrize("returned, message", [
    (lambda n: [1.0] * (n - 1), "must return a list of 3 values"),
    (lambda n: 1.0, "must return a list of 3 values"),
    (lambda n: [1.0, "high", 0.0], "returned 'high' for completion 1"),
    (lambda n: [1.0, float("nan"), 0.0], "returned nan for completion 1"),
])
def test_a_bad_return_is_named(returned, message):
    def bad(prompts, completions, **columns):
        return returned(len(completions))
    with pytest.raises(LowraxError, match=message):
        score([bad], None, ["p"] * 3, ["a", "b", "c"], {})
    with pytest.raises(LowraxError, match="2 reward weights for 1 reward functions"):
        score([bad], [1.0, 2.0], ["p"] * 3, ["a", "b", "c"], {})


def test_final_number_reads_the_last_number_against_the_answer():
    reward = reward_function("final_number")
    completions = ["14 + 15 = 29", "29", "It is 1,024.", "30, no: 29 is wrong, 31", "no number", "-3", "2.50"]
    answers = ["29", "29", "1024", "29", "29", "-3", "2.5"]
    assert reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert reward(None, ["29"], answer=[None]) == [None]  # no answer: not scored
    assert reward_function("final_number", answer_field="solution")(None, ["7"], solution=["7"]) == [1.0]
    with pytest.raises(LowraxError, match="reads the column 'answer'"):
        reward(None, ["7"], solution=["7"])


@pytest.mark.parametrize("spec, completions, expected", [
    ("exact_match", [" 4 ", "5"], [1.0, 0.0]),
    ("exact_match=solution", ["5", "4"], [1.0, 0.0]),
    (r"format_match=\d+", ["4", "four 4"], [1.0, 0.0]),
    (r"regex_match=\d", ["four 4", "four"], [1.0, 0.0]),
    ("length_penalty=2", ["abcd", "ab"], [-1.0, 0.0]),
])
def test_a_config_names_a_built_in_and_its_option_after_an_equals_sign(spec, completions, expected):
    reward = reward_from_spec(spec)
    assert reward(None, completions, answer=["4", "4"], solution=["5", "5"]) == expected


@pytest.mark.parametrize("spec, message", [
    ("regex_match", "needs its pattern"),
    ("length_penalty=long", "an integer; got 'long'"),
    ("json:loads=3", "only the built-ins"),
    ("nothing_like_it", "unknown reward 'nothing_like_it'"),
])
def test_bad_reward_specs_are_named(spec, message):
    with pytest.raises(LowraxError, match=message):
        reward_from_spec(spec)
