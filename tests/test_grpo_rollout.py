"""GRPO rollouts: num_generations sampled completions per prompt from the compiled generator, padded for the
policy loss (left-padded prompts, completions through their first EOS, truncation flagged), reproducible by
seed, and compiled once per shape across steps."""

from __future__ import annotations

import numpy as np
import pytest

from lowrax.errors import LowraxError
from lowrax.models.generate import _compiled
from lowrax.models.sampling import SamplingConfig
from lowrax.objectives.grpo import rollout
from tests.test_eval_loss import LLAMA, random_model

EOS = (1, 2, 3, 4)  # a random model hits one of these now and then: some completions stop, some run out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("rollout-llama"), LLAMA)


def prompts(seed, lengths=(3, 7, 5)):
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 64, n).tolist() for n in lengths]


def test_completions_are_grouped_padded_and_cut_after_their_first_eos(tiny):
    model, params = tiny
    out = rollout(model, params, prompts(0), num_generations=4, max_completion_length=10,
                  sampling=SamplingConfig(temperature=1.0), eos_token_ids=EOS, seed=3)
    assert out.prompt_ids.shape == out.prompt_mask.shape == (12, 32)  # the generator's prompt bucket
    assert out.completion_ids.shape == out.completion_mask.shape == (12, 10)
    for row, prompt in enumerate(p for p in prompts(0) for _ in range(4)):
        assert out.prompt_ids[row, 32 - len(prompt):].tolist() == prompt and out.prompt_mask[row].sum() == len(prompt)
        length = int(out.completion_mask[row].sum())
        tokens = out.completion_ids[row, :length].tolist()
        assert out.completion_mask[row, :length].all()  # one run of ones from the start
        assert not any(t in EOS for t in tokens[:-1])
        assert out.truncated[row] == (tokens[-1] not in EOS) and (not out.truncated[row] or length == 10)
    assert out.truncated.any() and not out.truncated.all()  # both kinds occur here
    masked = out.masked_truncated()
    assert (masked.completion_mask[out.truncated] == 0).all()
    assert (masked.completion_mask[~out.truncated] == out.completion_mask[~out.truncated]).all()


def test_sampling_is_reproducible_by_seed_and_greedy_groups_are_identical(tiny):
    model, params = tiny
    sample = lambda seed: rollout(model, params, prompts(1), 3, 8, SamplingConfig(temperature=1.0, top_k=20),  # noqa: E731
                                  EOS, seed=seed)
    first, again, other = sample(5), sample(5), sample(6)
    np.testing.assert_array_equal(first.completion_ids, again.completion_ids)
    assert not np.array_equal(first.completion_ids, other.completion_ids)
    greedy = rollout(model, params, prompts(1), 3, 8, SamplingConfig(), EOS)
    groups = greedy.completion_ids.reshape(3, 3, 8)
    assert (groups == groups[:, :1]).all()


def test_later_steps_of_the_same_shapes_compile_nothing(tiny):
    model, params = tiny
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    rollout(model, params, prompts(2), 2, 6, sampling, EOS, seed=0)
    prefill, step = _compiled(model, sampling)
    sizes = prefill._cache_size(), step._cache_size()
    for seed in range(1, 4):  # other prompts of other lengths within the bucket, other seeds
        rollout(model, params, prompts(seed + 10, lengths=(2 + seed, 9, 4)), 2, 6, sampling, EOS, seed=seed)
    assert (prefill._cache_size(), step._cache_size()) == sizes


def test_bad_counts_are_named(tiny):
    model, params = tiny
    with pytest.raises(LowraxError, match="num_generations and max_completion_length must be >= 1"):
        rollout(model, params, prompts(0), 0, 8, SamplingConfig(), EOS)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)])
def test_one_prefill_per_prompt_samples_what_prefilling_every_copy_does(tiny, sampling):
    """The rollout prefills each prompt once and copies its cache for its completions: the same rows, with the
    same keys, as generating from every copy of the prompt."""
    from lowrax.models.generate import generate_ids

    model, params = tiny
    shared = rollout(model, params, prompts(4), 3, 8, sampling, EOS, seed=2)
    copies = generate_ids(model, params, [p for p in prompts(4) for _ in range(3)], 8, sampling, EOS, seed=2)
    assert [row[: int(m.sum())].tolist() for row, m in zip(shared.completion_ids, shared.completion_mask)] == copies


def test_completion_log_probs_and_entropy_are_taken_at_the_sampling_temperature(tiny):
    """As TRL scores completions: log_softmax(logits / temperature) at each completion token, and the entropy
    of that distribution, equal to the plain computation from the model's whole logits."""
    import jax
    import jax.numpy as jnp

    from lowrax.objectives.logps import completion_token_logps

    model, params = tiny
    out = rollout(model, params, prompts(5), 2, 6, SamplingConfig(temperature=1.0), EOS, seed=1)
    arrays = [jnp.asarray(a) for a in (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)]
    logps, entropy = completion_token_logps(model, params, *arrays, temperature=0.7, with_entropy=True)
    ids, mask = jnp.concatenate(arrays[::2], 1), jnp.concatenate(arrays[1::2], 1)
    p = out.prompt_ids.shape[1]
    logits = model.apply(params, ids, mask)
    logits = (logits if not hasattr(logits, "logits") else logits.logits)[:, p - 1:-1].astype(jnp.float32) / 0.7
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), arrays[2][..., None], -1)[..., 0]
    expected_entropy = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)
    keep = np.asarray(out.completion_mask, bool)
    np.testing.assert_allclose(np.asarray(logps)[keep], np.asarray(expected)[keep], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[keep], np.asarray(expected_entropy)[keep], atol=1e-4)


def test_the_step_batch_cuts_or_pads_the_prompts_on_the_left(tiny):
    model, params = tiny
    out = rollout(model, params, prompts(0), 2, 4, SamplingConfig(), EOS, pad_token_id=9)  # prompts of 3..7 tokens
    for width in (7, 16, 48):
        batch = out.batch(np.zeros(6), width)
        assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (6, width)
        np.testing.assert_array_equal(batch["prompt_mask"].sum(1), out.prompt_mask.sum(1))
        np.testing.assert_array_equal(batch["prompt_ids"][:, -7:], out.prompt_ids[:, -7:])  # every prompt ends last
        assert (batch["prompt_ids"][batch["prompt_mask"] == 0] == 9).all()
    with pytest.raises(LowraxError, match="narrower than the longest prompt"):
        out.batch(np.zeros(6), 6)
